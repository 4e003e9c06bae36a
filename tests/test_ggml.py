"""GGUF weights kept in llama.cpp's block formats (model/ggml.py, kernels/ggml.cpp): the kernels'
dequantization is gguf.quants' bit for bit, their products match the dequantized matmul, and a
quantized GGUF loads packed and generates what its fp32 dequantization generates."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import make_hf_model, write_hf_as_gguf

import pocketlm
from pocketlm.errors import UnsupportedModel
from pocketlm.model import ggml

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
ALL_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"]
K_QUANTS = {"Q4_K": 2, "Q5_K": 2, "Q6_K": 208}  # byte offset of the first fp16 scale field


@pytest.fixture(autouse=True)
def fp32_prefill(monkeypatch):
    """These tests pin the fp32 products (to gguf.quants' values, to 1e-5); the bf16 ones that
    packed prefill runs by default where the CPU has bf16 GEMMs are tests/test_bf16_prefill.py's."""
    monkeypatch.setenv("POCKETLM_BF16_PREFILL", "0")


def random_blocks(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, row_bytes) uint8 of valid blocks: gguf.quants.quantize where it exists, otherwise
    (the K-quants) random bytes with finite fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    qtype = Q[name]
    if name in K_QUANTS:
        _, qk, nbytes = ggml.TYPES[int(qtype)]
        raw = rng.integers(0, 256, size=(n * k // qk, nbytes), dtype=np.uint8)
        scales = rng.uniform(1e-3, 5e-2, size=(n * k // qk, 2)).astype(np.float16)
        if name == "Q6_K":
            raw[:, 208:210] = scales[:, :1].view(np.uint8)
        else:  # d and dmin
            raw[:, 0:4] = scales.view(np.uint8)
        return raw.reshape(n, -1)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if name == "BF16":
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, -1)
    return np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).reshape(n, -1)


def reference(blocks: np.ndarray, name: str, k: int) -> torch.Tensor:
    if name == "BF16":
        return torch.from_numpy(blocks.copy()).view(torch.bfloat16).float()
    return torch.from_numpy(gguf.quants.dequantize(blocks, Q[name]).reshape(-1, k).astype(np.float32))


def module(name, n, k, seed=0):
    blocks = random_blocks(name, n, k, seed)
    return ggml.GGMLLinear(int(Q[name]), n, k, torch.from_numpy(blocks)), reference(blocks, name, k)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_is_gguf_bit_for_bit(name):
    k = 512 if name in K_QUANTS else 96
    m, ref = module(name, 37, k)
    assert torch.equal(m.dequantize(), ref)
    ids = torch.tensor([[5, 0], [36, 5]])
    emb = ggml.GGMLEmbedding(m.qtype, 37, k, m.blocks)
    assert torch.equal(emb(ids), ref[ids])
    assert torch.equal(m.dequantize(slice(3, 20)), ref[3:20])


@pytest.fixture
def fp32_act():
    """fp32 activations in the quantized products (their int8 default, which rounds x, is
    tested against its own reference in tests/test_ggml_int8.py)."""
    lib = ggml._lib()
    before = None if lib is None else lib.pocketlm_ggml_set_int8_act(0)
    yield
    if lib is not None:
        lib.pocketlm_ggml_set_int8_act(before)


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_products_match_dequantized_matmul(name, rows, fp32_act):
    # odd output widths (not a multiple of the threads' chunks); 13 rows: the tiled GEMM path
    k = 768 if name in K_QUANTS else 160
    m, ref = module(name, 301, k, seed=rows)
    x = torch.randn(rows, k)
    want = x.double() @ ref.double().T
    got = m(x)
    assert got.shape == (rows, 301) and got.dtype == torch.float32
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() < 1e-5 * scale * k**0.5
    # many output rows: the threaded path gives the same numbers, row by row
    big, big_ref = module(name, 2051, k, seed=1)
    y = big(x[:1])
    assert torch.allclose(y.double(), x[:1].double() @ big_ref.double().T, rtol=1e-4, atol=1e-3)


def test_tiled_prefill_path_covers_every_row(monkeypatch):
    monkeypatch.setattr(ggml, "TILE_BYTES", 4 * 96 * 20)  # 20 rows a tile: 301 = 15 tiles + 1
    m, ref = module("Q8_0", 301, 96)
    x = torch.randn(2, 11, 96)
    assert torch.allclose(m(x), x @ ref.T, rtol=1e-4, atol=1e-4)


def test_unsupported_type_is_named_with_the_supported_ones():
    with pytest.raises(UnsupportedModel, match=r"Q2_K.*Q4_K.*Q6_K"):
        ggml.check_type(int(Q.Q2_K), "blk.0.attn_q.weight")


@pytest.fixture(scope="module", params=[("llama", "Q8_0"), ("qwen2", "Q4_0"), ("gemma3", "Q5_1")])
def quantized_gguf(request, tmp_path_factory):
    arch, qtype = request.param
    path = tmp_path_factory.mktemp("ggml") / f"tiny-{arch}-{qtype}.gguf"
    write_hf_as_gguf(make_hf_model(arch), path, Q[qtype])
    return path, qtype


def test_quantized_gguf_loads_packed_and_matches_fp32(quantized_gguf):
    path, qtype = quantized_gguf
    packed = pocketlm.load(path)
    dense = pocketlm.load(path, dtype=torch.float32)
    net = packed.network
    kinds = {type(m).__name__ for m in net.modules() if isinstance(m, ggml.GGMLTensor)}
    assert kinds >= {"GGMLLinear", "GGMLEmbedding"}
    assert all(m.type_name == qtype for m in ggml.packed_modules(net))
    assert not [n for n, p in net.named_parameters() if p.dim() > 1]  # no fp32 weight matrix
    if net.config.tie_embeddings:
        assert isinstance(net.lm_head, ggml.TiedGGMLHead)
        assert net.lm_head.embedding is net.embed_tokens
    assert qtype in repr(net)
    ids = packed.encode("The quick brown fox jumps over the lazy dog. 0123456789")
    a, b = packed.logits(ids), dense.logits(ids)
    assert torch.allclose(a, b, atol=1e-4 * b.abs().max().item() + 1e-5)
    for prompt in ["Once upon a time", "def f(x):", "1, 2, 3,"]:
        assert packed.generate(prompt, max_tokens=12, temperature=0) == \
            dense.generate(prompt, max_tokens=12, temperature=0)


def test_a_packed_model_saves_as_a_folder_that_loads_back(quantized_gguf, tmp_path):
    path, _ = quantized_gguf
    packed = pocketlm.load(path)
    back = pocketlm.load(packed.save(tmp_path / "saved"))  # blocks dequantized into safetensors
    ids = packed.encode("The quick brown fox jumps over the lazy dog.")
    assert torch.allclose(back.logits(ids), packed.logits(ids), atol=1e-4, rtol=1e-4)
    assert back.generate("Once upon a time", max_tokens=8, temperature=0) == \
        packed.generate("Once upon a time", max_tokens=8, temperature=0)


# -- the real Qwen2.5-Coder 0.5B Q4_K_M file (Q5_0, Q8_0, Q4_K, Q6_K), when it has been pulled --
# Network level (token ids, no tokenizer), so these test the weights alone.
REAL = "qwen2.5-coder-0.5b-instruct"
PROMPTS = [
    "def fibonacci(n):", "The capital of France is", "import numpy as np\n", "Once upon a time",
    "SELECT name FROM users WHERE", "Water boils at", "class Stack:\n    def __init__(self):",
    "The three primary colours are", "for i in range(10):", "Machine learning is",
    "#include <stdio.h>\nint main() {", "A haiku about autumn:\n",
]


def _real_path():
    from pocketlm.formats import registry

    path = registry.stored_path(REAL)
    if path is None:
        pytest.skip(f"{REAL} is not pulled (pocketlm pull {REAL})")
    return path


def _networks(path, dense: bool):
    from pocketlm.api import build_gguf_network, build_network
    from pocketlm.formats import gguf as gguf_format

    f = gguf_format.GGUFFile(path)
    config = gguf_format.read_config(f)
    if dense:
        return build_network(config, gguf_format.read_state_dict(f, config), source=str(path))
    return build_gguf_network(f, config, source=str(path))


def _prompt_ids(path) -> list[list[int]]:
    """The prompts' token ids with the file's tokenizer, or fixed ids where it cannot be built."""
    from pocketlm.formats import gguf as gguf_format
    from pocketlm.model.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf_metadata(gguf_format.GGUFFile(path).metadata)
        return [tok.encode(p) for p in PROMPTS]
    except pocketlm.PocketError:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(100, 20000, (8 + i,), generator=g).tolist() for i in range(12)]


@torch.inference_mode()
def _greedy(network, ids: list[int], n: int) -> list[int]:
    from pocketlm.engine.generate import decode_step, prefill
    from pocketlm.model.transformer import KVCache

    cache = KVCache.allocate(network.config, 1, len(ids) + n + 1, torch.float32)
    out = [int(prefill(network, cache, 0, ids).argmax())]
    for i in range(n - 1):
        logits = decode_step(network, cache, torch.tensor(out[-1:]), torch.tensor([len(ids) + i]))
        out.append(int(logits[0].argmax()))
    return out


_RSS_SCRIPT = """
import json, resource, sys
import torch
from pocketlm.engine.generate import prefill
from pocketlm.model import ggml
from pocketlm.model.transformer import KVCache
sys.path.insert(0, sys.argv[2])
from test_ggml import _networks
torch.set_num_threads(2)
ggml._lib()  # the interpreter, torch and the kernels: the baseline before any weight
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
net = _networks(sys.argv[1], dense=False)
cache = KVCache.allocate(net.config, 1, 512, torch.float32)
with torch.inference_mode():
    prefill(net, cache, 0, list(range(100, 164)))
print(json.dumps({"base": base, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "cache": cache.nbytes}))
"""


@pytest.mark.slow
def test_real_gguf_peak_rss_is_about_its_file_size():
    from pathlib import Path

    path = _real_path()
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    # what loading and running the model adds to the interpreter, torch and the kernels
    assert r["rss"] - r["base"] <= 1.2 * size + r["cache"], (r, size)


@pytest.mark.slow
def test_real_gguf_packed_matches_its_fp32_dequantization(fp32_act):
    # the weights alone, so fp32 activations (int8 ones, the decode default, keep 8 of these
    # 12 greedy continuations and change WikiText-2 perplexity by -0.2%: test_ggml_int8.py)
    path = _real_path()
    packed, dense = _networks(path, dense=False), _networks(path, dense=True)
    assert {m.type_name for m in ggml.packed_modules(packed)} >= {"Q4_K", "Q6_K"}
    assert isinstance(packed.embed_tokens, ggml.GGMLEmbedding)
    kls, same = [], 0
    with torch.inference_mode():
        for ids in _prompt_ids(path):
            t = torch.tensor([ids])
            p = torch.log_softmax(packed(t)[0].double(), -1)
            d = torch.log_softmax(dense(t)[0].double(), -1)
            kls.append((d.exp() * (d - p)).sum(-1).mean().item())
            same += _greedy(packed, ids, 32) == _greedy(dense, ids, 32)
    assert max(kls) < 1e-3 and same >= 11, (kls, same)


def test_weight_rewriting_steps_take_a_packed_model(quantized_gguf):
    """quantize and prune work on a GGUF loaded packed (its blocks' fp32 values), and leave the
    packed original as it was."""
    from pocketlm.compress.prune import prune
    from pocketlm.compress.quantize import quantize

    path, qtype = quantized_gguf
    packed = pocketlm.load(path)
    dense = pocketlm.load(path, dtype=torch.float32)
    ids = packed.encode("The quick brown fox jumps over the lazy dog.")
    q = quantize(packed, "rtn", 8, group_size=0, progress=False)
    q_ref = quantize(dense, "rtn", 8, group_size=0, progress=False)
    assert torch.allclose(q.logits(ids), q_ref.logits(ids), atol=1e-4, rtol=1e-4)
    p = prune(packed, "magnitude", 0.25, progress=False)
    p_ref = prune(dense, "magnitude", 0.25, progress=False)
    assert torch.allclose(p.logits(ids), p_ref.logits(ids), atol=1e-4, rtol=1e-4)
    assert all(m.type_name == qtype for m in ggml.packed_modules(packed.network))
