"""The real models' tokenizers, rebuilt from their GGUF metadata, against llama.cpp and transformers.

Token ids must be llama.cpp's on every golden text (../shared/golden: Qwen2.5's byte-level BPE
with its "qwen2" pre-tokenizer, Gemma 3's SentencePiece-style vocabulary with BOS); Qwen's chat
template must render exactly as transformers' ``apply_chat_template`` renders the same template
string. Skipped where a model is not pulled (``pocketlm pull NAME``).
"""

from __future__ import annotations

import json

import pytest

from pocketlm.formats import registry
from pocketlm.formats.gguf import GGUFFile
from pocketlm.model.tokenizer import Tokenizer

QWEN, GEMMA = "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"
pytestmark = pytest.mark.slow  # real files; Gemma's 262k-piece vocabulary takes seconds to build


def _tokenizer(name: str) -> Tokenizer:
    path = registry.stored_path(name)
    if path is None:
        pytest.skip(f"{name} is not pulled (pocketlm pull {name})")
    return Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, source=path.name)


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return _tokenizer(QWEN)


@pytest.fixture(scope="module")
def gemma() -> Tokenizer:
    return _tokenizer(GEMMA)


def _golden(golden, name):
    return json.loads((golden / f"{name}.tokens.json").read_text())


def test_qwen_ids_are_llama_cpps_on_every_golden_text(qwen, golden):
    cases = _golden(golden, QWEN)
    assert len(cases) == 34
    for case in cases:  # Qwen adds no BOS
        assert qwen.encode(case["text"]) == case["ids"], case["text"]
        assert qwen.decode(case["ids"]) == case["text"]


def test_gemma_ids_are_llama_cpps_with_bos_first(gemma, golden):
    assert gemma.add_bos and gemma.bos_id == 2
    for case in _golden(golden, GEMMA):  # the golden ids were made with --no-bos
        assert gemma.encode(case["text"]) == [2, *case["ids"]], case["text"]
        assert gemma.decode(case["ids"]) == case["text"]


def test_gemma_falls_back_to_bytes_for_characters_outside_its_vocabulary(gemma):
    text = "\U000e0100"  # a variation selector the vocabulary has no piece for
    ids = gemma.encode(text, add_bos=False)
    assert [gemma.backend.id_to_token(i) for i in ids] == ["<0xF3>", "<0xA0>", "<0x84>", "<0x80>"]
    assert gemma.decode(ids) == text


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CONVERSATIONS = {
    "no system": ([{"role": "user", "content": "Write a haiku about tea."}], None),
    "system": ([{"role": "system", "content": "Answer in French, é à ü."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Bonjour !"},
                {"role": "user", "content": "Et alors ?"}], None),
    "tools": ([{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                   "name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "{\"temp\": 21}"},
               {"role": "tool", "content": "{\"sky\": \"clear\"}"}], TOOLS),
    "tools and system": ([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Weather in Oslo?"}], TOOLS),
}


@pytest.mark.parametrize("case", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_qwen_chat_template_renders_as_transformers_does(qwen, case, generation_prompt):
    transformers = pytest.importorskip("transformers")
    messages, tools = CONVERSATIONS[case]
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=qwen.backend, chat_template=qwen.chat_template)
    expected = theirs.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    extra = {"tools": tools} if tools else {}
    ours = qwen.apply_chat_template(messages, add_generation_prompt=generation_prompt, **extra)
    assert ours == expected
    assert ours.startswith("<|im_start|>system\n")
    ids = qwen.encode(ours)  # the markup is one special id each, as llama.cpp parses it
    assert ids.count(qwen.backend.token_to_id("<|im_start|>")) == ours.count("<|im_start|>")
