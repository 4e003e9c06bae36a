"""Exports: GGUF read back by pocketlm and by the gguf package, HF read by transformers, and
GPTQ int4 group-32 codes carried into Q4_0 / Q4_1 blocks without re-rounding."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_model

import pocketlm
from pocketlm.compress import quantize
from pocketlm.compress.qlinear import QuantizedTensor
from pocketlm.errors import InvalidArgument
from pocketlm.formats.export import ExportError, permute_qk, write_gguf, write_hf
from pocketlm.formats.gguf import unpermute

TEXT = "the cat sat on the mat, then in the hat; a thin hen ate the tea. " * 40
PROMPT = "hello there, the thing in a box"
LLAMA_BIN = Path(__file__).resolve().parents[1] / ".peer" / "build" / "bin"


@pytest.fixture(autouse=True)
def fp32_prefill(monkeypatch):
    """Exports are checked against the values the codes stand for, so the products stay fp32
    (packed prefill runs in bf16 by default where the CPU has bf16 GEMMs: test_bf16_prefill.py)."""
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(TEXT)
    return p


def _gptq(model, calib, sym):
    return quantize(model, "gptq", 4, 32, sym=sym, calibration=str(calib), samples=4,
                    seq_len=64, progress=False)


def _blocks(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def test_gguf_f32_round_trip_is_exact(model, tmp_path):
    import gguf

    path = write_gguf(model, tmp_path / "m.gguf", "f32")
    ids = model.encode(PROMPT)
    back = pocketlm.load(path, dtype=torch.float32)
    assert back.encode(PROMPT) == ids  # the tokenizer travels: vocabulary, merges, pre-tokenizer
    assert back.tokenizer.chat_template == model.tokenizer.chat_template
    assert torch.equal(back.logits(ids), model.logits(ids))
    # the gguf package's reader sees llama.cpp's layout: names, metadata, permuted Q/K rows
    r = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    q = _blocks(r, "blk.0.attn_q.weight")
    ours = model.network.layers[0].self_attn.q_proj.weight.detach().contiguous().numpy()
    np.testing.assert_array_equal(np.asarray(q.data).reshape(ours.shape), permute_qk(ours, 4))
    assert "output.weight" not in {t.name for t in r.tensors}  # tied: llama.cpp reuses token_embd


def test_gguf_f16_within_half_precision(model, tmp_path):
    ids = model.encode(PROMPT)
    back = pocketlm.load(write_gguf(model, tmp_path / "m.gguf"), dtype=torch.float32)  # auto on a float model: F16
    ref = model.logits(ids)
    err = (back.logits(ids) - ref).abs().max().item()
    assert 0 < err < 1e-2 * ref.abs().max().item()


def test_gptq_int4_g32_symmetric_becomes_q4_0_bit_exact(model, calib, tmp_path):
    import gguf

    q = _gptq(model, calib, sym=True)
    path = write_gguf(q, tmp_path / "q.gguf", "auto")
    r = gguf.GGUFReader(str(path))
    down = _blocks(r, "blk.1.ffn_down.weight")
    assert down.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert _blocks(r, "token_embd.weight").tensor_type == gguf.GGMLQuantizationType.Q8_0
    mod = q.network.layers[1].mlp.down_proj
    w = gguf.quants.dequantize(down.data, down.tensor_type).reshape(mod.out_features, -1)
    assert np.array_equal(w, mod.dequantize().numpy())  # every weight, bit for bit
    ids = model.encode(PROMPT)
    back = pocketlm.load(path, dtype=torch.float32)
    assert torch.equal(back.logits(ids), q.logits(ids))


def test_gptq_int4_g32_asymmetric_becomes_q4_1_keeping_codes(model, calib, tmp_path):
    import gguf

    q = _gptq(model, calib, sym=False)
    path = write_gguf(q, tmp_path / "q.gguf", "auto")
    r = gguf.GGUFReader(str(path))
    for i, name in ((0, "self_attn.q_proj"), (1, "mlp.gate_proj"), (1, "mlp.down_proj")):
        mod = q.network.layers[i].get_submodule(name)
        assert isinstance(mod, QuantizedTensor)
        gname = {"self_attn.q_proj": "attn_q", "mlp.gate_proj": "ffn_gate",
                 "mlp.down_proj": "ffn_down"}[name]
        t = _blocks(r, f"blk.{i}.{gname}.weight")
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        n, nb = mod.out_features, mod.in_features // 32
        raw = np.asarray(t.data).reshape(n, nb, 20)
        if gname == "attn_q":  # undo llama.cpp's row interleaving to compare row by row
            raw = unpermute(np.asarray(t.data).reshape(n, nb * 20), 4).reshape(n, nb, 20)
        d = raw[:, :, 0:2].copy().view(np.float16)[..., 0]
        m = raw[:, :, 2:4].copy().view(np.float16)[..., 0]
        qs = raw[:, :, 4:].reshape(n, nb * 16)
        assert np.array_equal(qs, mod.qweight.numpy())  # codes: bit for bit
        assert np.array_equal(d, mod.scales.numpy())  # group 32 = block 32: scales bit for bit
        zeros = np.round(-m.astype(np.float32) / d.astype(np.float32))
        assert np.array_equal(zeros.astype(np.uint8), mod.zeros.numpy())  # zero points recovered
        # the offset m = -z*s is an fp16: off the exact product by at most half an fp16 ulp
        exact = -mod.zeros.numpy().astype(np.float64) * d.astype(np.float64)
        assert np.all(np.abs(m - exact) <= np.abs(exact) * 2.0**-11 + 2.0**-25)
    ids = model.encode(PROMPT)
    err = (pocketlm.load(path, dtype=torch.float32).logits(ids) - q.logits(ids)).abs().max().item()
    assert err < 1e-2


def test_grids_gguf_cannot_express_are_refused(model, tmp_path):
    q3 = quantize(model, "rtn", 3, 32, progress=False)
    with pytest.raises(ExportError, match="int3 symmetric .* no GGUF block type"):
        write_gguf(q3, tmp_path / "q3.gguf", "auto")
    assert not list(tmp_path.iterdir())  # nothing half-written is left
    back = pocketlm.load(write_gguf(q3, tmp_path / "q3.gguf", "q4_0"), dtype=torch.float32)  # requantize, asked for
    assert back.config.n_layers == 2


def test_existing_output_needs_force(model, tmp_path):
    path = write_gguf(model, tmp_path / "m.gguf", "f32")
    with pytest.raises(InvalidArgument, match="--force"):
        write_gguf(model, path, "f32")
    write_gguf(model, path, "f16", force=True)
    out = write_hf(model, tmp_path / "hf", "fp32")
    with pytest.raises(InvalidArgument, match="--force"):
        write_hf(model, out)


def test_hf_export_loads_in_transformers(model, calib, tmp_path):
    import transformers

    ids = model.encode(PROMPT)
    out = write_hf(model, tmp_path / "hf", "fp32")
    assert (out / "README.md").is_file() and (out / "card.json").is_file()
    tm = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(PROMPT)["input_ids"] == ids
    with torch.no_grad():
        theirs = tm(torch.tensor([ids])).logits[0]
    assert (theirs - model.logits(ids)).abs().max().item() < 1e-4
    assert torch.equal(pocketlm.load(out).logits(ids), model.logits(ids))
    # a quantized model exports dequantized: transformers computes what our codes stand for
    q = _gptq(model, calib, sym=False)
    qout = write_hf(q, tmp_path / "hfq", "fp32")
    tq = transformers.AutoModelForCausalLM.from_pretrained(qout)
    with torch.no_grad():
        assert (tq(torch.tensor([ids])).logits[0] - q.logits(ids)).abs().max().item() < 1e-2
    assert "dequantized_from" in (qout / "card.json").read_text()


@pytest.mark.integration
@pytest.mark.skipif(not (LLAMA_BIN / "llama-perplexity").is_file(),
                    reason="llama.cpp not built (bash bench/build_llama_cpp.sh)")
def test_llama_cpp_loads_the_exports(model, calib, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    for name, m, qtype in (("f16", model, "f16"), ("q41", _gptq(model, calib, False), "auto")):
        path = write_gguf(m, tmp_path / f"{name}.gguf", qtype)
        r = subprocess.run([str(LLAMA_BIN / "llama-perplexity"), "-m", str(path), "-f", str(text),
                            "-c", "64", "-b", "64", "-t", "1"], check=False, capture_output=True,
                           text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout + r.stderr
        line = next((s for s in out.splitlines() if "Final estimate" in s), None)
        assert line, f"llama-perplexity printed no estimate for {name}:\n{out[-1500:]}"
        ppl = float(line.split("=")[1].split()[0])
        assert math.isfinite(ppl) and 1 < ppl < 1000


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_every_architecture_exports_as_llama_cpp_converts_it(arch, tmp_path):
    """Each family's GGUF equals, tensor for tensor, what llama.cpp's converter writes for the
    same transformers model (tests/tiny.py's reference), and reads back with equal logits; its
    HF export gives transformers the source's logits."""
    import gguf
    import tiny
    import transformers

    if not hasattr(tiny, "make_hf_model"):
        pytest.skip("tests/tiny.py has no transformers reference models yet")
    hf = tiny.make_hf_model(arch)
    m = pocketlm.load(tiny.save_hf_folder(hf, tmp_path / "src"))
    ids = m.encode(PROMPT)
    ours = {t.name: t for t in gguf.GGUFReader(str(write_gguf(m, tmp_path / "m.gguf", "f32"))).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(str(tiny.write_hf_as_gguf(hf, tmp_path / "r.gguf"))).tensors}
    assert set(ours) == set(ref)
    for name, t in ours.items():
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(ref[name].data))
    assert torch.equal(pocketlm.load(tmp_path / "m.gguf", dtype=torch.float32).logits(ids), m.logits(ids))
    tm = transformers.AutoModelForCausalLM.from_pretrained(write_hf(m, tmp_path / "hf", "fp32"))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
        assert (tm(torch.tensor([ids])).logits[0] - want).abs().max().item() < 1e-4


def test_what_gguf_cannot_say_is_refused_by_name(tmp_path):
    import tiny

    if not hasattr(tiny, "make_hf_model"):
        pytest.skip("tests/tiny.py has no transformers reference models yet")
    m = pocketlm.load(tiny.save_hf_folder(tiny.make_hf_model("gemma3-capped"), tmp_path / "src"))
    with pytest.raises(ExportError, match="query_pre_attn_scalar=24.0 .* no key for it"):
        write_gguf(m, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.fixture(scope="module")
def real_model():
    from pocketlm.formats import registry

    if not registry.stored_path("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not pulled (pocketlm pull smollm2-135m-instruct)")
    return pocketlm.load("smollm2-135m-instruct", dtype=torch.float32)


@pytest.mark.slow
def test_real_model_gguf_carries_the_source_vocabulary(real_model, tmp_path):
    """SmolLM2's F16 export holds the very tokens, types and merges of the GGUF it came from,
    and reads back with the same token ids and logits within F16's precision."""
    import gguf

    from pocketlm.api import resolve

    path = write_gguf(real_model, tmp_path / "s.gguf", "f16")
    ours = gguf.GGUFReader(str(path)).fields
    src = gguf.GGUFReader(str(resolve("smollm2-135m-instruct"))).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours[key].contents() == src[key].contents(), key
    text = "The 12 quick brown foxes ½ jumped\n\n<|im_start|>user\nHi<|im_end|>"
    back = pocketlm.load(path, dtype=torch.float32)
    ids = real_model.encode(text)
    assert back.encode(text) == ids
    ref = real_model.logits(ids)
    assert (back.logits(ids) - ref).abs().max().item() < 2e-3 * ref.abs().max().item()


# -- Gemma 3: the SentencePiece-style vocabulary ------------------------------------------------
SPM_TEXTS = ["the cat sat on the mat\n\nthen the hen ate", "  a  thin   tea, é 日本 😀",
             "<start_of_turn>user\nhi there<end_of_turn>\n", ""]


def _spm_metadata() -> dict:
    """A small Gemma-like vocabulary as GGUF holds it: controls, a user-defined piece, the 256
    byte pieces, scored pieces (merges rank by the score of the piece they make) and chars."""
    pieces = ["▁t", "he", "▁the", "in", "▁a", "at", "▁th", "en", "on", "▁s", "er", "an", "▁c",
              "▁h", "▁m", "ea", "▁te", "▁tea", "hen", "▁hen", "▁then", "▁cat", "▁sat", "▁on"]
    chars = list("▁abcdefghijklmnopqrstuvwxyz,.\n")
    controls = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = controls + ["\n\n"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    types = [3] * len(controls) + [4] + [6] * 256 + [1] * (len(pieces) + len(chars))
    scores = ([-1000.0] * (len(controls) + 1) + [0.0] * 256
              + [-float(i) for i in range(len(pieces) + len(chars))])
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": False}


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A tiny transformers Gemma 3 with the SentencePiece-style vocabulary, as a folder."""
    import tiny
    import transformers

    from pocketlm.model.tokenizer import Tokenizer

    meta = _spm_metadata()
    _, cfg_cls, extra = tiny.HF_ARCHS["gemma3"]
    config = getattr(transformers, cfg_cls)(
        **{**tiny._COMMON, **extra, "vocab_size": len(meta["tokenizer.ggml.tokens"]),
           "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("gemma_spm")
    hf.save_pretrained(folder, safe_serialization=True)
    source = Tokenizer.from_gguf_metadata(meta, source="test vocabulary")
    source.save(folder)
    return folder, meta, source


def test_gemma_gguf_round_trip_keeps_the_sentencepiece_vocabulary(tiny_gemma, tmp_path):
    """A Gemma 3 with a SentencePiece-style vocabulary exports to GGUF as llama.cpp's "llama"
    tokenizer (pieces, scores, token types, special ids) and reads back with the same token
    ids and logits; exporting that file again writes the very same vocabulary."""
    import gguf

    from pocketlm.model.tokenizer import Tokenizer

    folder, meta, source = tiny_gemma
    m = pocketlm.load(folder, dtype=torch.float32)  # a folder: its tokenizer.json has no scores
    path = write_gguf(m, tmp_path / "g.gguf", "f32")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}
    for key in ("model", "tokens", "token_type", "bos_token_id", "eos_token_id",
                "unknown_token_id", "padding_token_id", "add_bos_token", "add_space_prefix"):
        assert fields[f"tokenizer.ggml.{key}"] == meta[f"tokenizer.ggml.{key}"], key
    # the scores written rank every merge as the source's scores do, so text splits the same
    rebuilt = Tokenizer.from_gguf_metadata(fields, source=str(path))
    assert (json.loads(rebuilt.backend.to_str())["model"]["merges"]
            == json.loads(source.backend.to_str())["model"]["merges"])
    back = pocketlm.load(path, dtype=torch.float32)
    for text in SPM_TEXTS:
        assert back.encode(text) == m.encode(text) == source.encode(text), text
    # BOS, t, he, ▁cat, ▁sat, ▁on, ▁the: no space prefix, the best-scored merges first
    assert source.encode(SPM_TEXTS[0])[:7] == [2, 307, 264, 284, 285, 286, 265]
    ids = m.encode(SPM_TEXTS[0])
    assert torch.equal(back.logits(ids), m.logits(ids))
    again = write_gguf(back, tmp_path / "g2.gguf", "auto")  # F32 tensors: auto keeps them F16
    fields2 = {k: f.contents() for k, f in gguf.GGUFReader(str(again)).fields.items()}
    for key in ("tokens", "scores", "token_type", "bos_token_id", "unknown_token_id"):
        assert fields2[f"tokenizer.ggml.{key}"] == fields[f"tokenizer.ggml.{key}"], key


def test_sentencepiece_with_a_space_prefix_is_refused(tiny_gemma, tmp_path):
    from tokenizers import normalizers

    folder, _, _ = tiny_gemma
    m = pocketlm.load(folder, dtype=torch.float32)
    m.tokenizer.backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    with pytest.raises(ExportError, match="adds a space prefix.*--format hf"):
        write_gguf(m, tmp_path / "p.gguf")
    assert not (tmp_path / "p.gguf").exists()


@pytest.fixture(scope="module")
def real_gemma_export(tmp_path_factory):
    """gemma-3-270m loaded as it runs (packed Q4_K_M blocks) and exported with --type auto."""
    from pocketlm.api import resolve
    from pocketlm.formats import registry

    if not registry.stored_path("gemma-3-270m"):
        pytest.skip("gemma-3-270m is not pulled (pocketlm pull gemma-3-270m --accept-license)")
    m = pocketlm.load("gemma-3-270m")
    path = write_gguf(m, tmp_path_factory.mktemp("gemma") / "gemma.gguf", "auto")
    return m, Path(resolve("gemma-3-270m")), path


@pytest.mark.slow
def test_real_gemma_exports_its_own_blocks_and_vocabulary(real_gemma_export, golden):
    """--type auto writes the source's very blocks and its vocabulary (pieces, types, special
    ids): the file reads back with llama.cpp's ids on every golden text and identical logits."""
    from pocketlm.formats.gguf import GGUFFile

    m, src_path, path = real_gemma_export
    src, out = GGUFFile(src_path), GGUFFile(path)
    assert set(out.tensors) == set(src.tensors)
    for name, t in src.tensors.items():
        assert out.tensors[name].tensor_type == t.tensor_type, name
        assert np.array_equal(out.tensors[name].data, t.data), name
    for key in ("model", "tokens", "token_type", "bos_token_id", "eos_token_id",
                "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token",
                "add_space_prefix"):
        assert out.get(f"tokenizer.ggml.{key}") == src.get(f"tokenizer.ggml.{key}"), key
    back = pocketlm.load(path)
    for case in json.loads((golden / "gemma-3-270m.tokens.json").read_text()):
        assert back.encode(case["text"]) == [2] + case["ids"], case["text"][:40]
    ids = m.encode("The capital of France is Paris. The capital of Japan is")
    assert torch.equal(back.logits(ids), m.logits(ids))


@pytest.mark.slow
@pytest.mark.skipif(not (LLAMA_BIN / "llama-perplexity").is_file(),
                    reason="llama.cpp not built (bash bench/build_llama_cpp.sh)")
def test_llama_cpp_runs_the_gemma_export_as_the_source(real_gemma_export, shared_data, tmp_path):
    """llama.cpp tokenizes and scores a WikiText-2 excerpt with our export exactly as with the
    file it came from: the same token count and the same perplexity after every chunk."""
    _, src_path, path = real_gemma_export
    wiki = next((shared_data / "wikitext-2-raw").glob("*test*"), None)
    text = tmp_path / "t.txt"
    text.write_text(wiki.read_text()[:3000] if wiki else TEXT)

    def run(model_path):  # every chunk of the text: the chunk count follows the token count
        r = subprocess.run([str(LLAMA_BIN / "llama-perplexity"), "-m", str(model_path), "-f",
                            str(text), "-c", "128", "-b", "128", "-t", "1"],
                           check=False, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout + r.stderr
        found = [re.search(r"calculating perplexity over \d+ chunks|\[1\][\d.,\[\]]+|"
                           r"Final estimate: PPL = [\d.]+ \+/- [\d.]+", line)
                 for line in out.splitlines()]
        found = [f.group(0) for f in found if f]
        assert len(found) == 3, out[-1500:]
        return found

    assert run(path) == run(src_path)
