"""response_format: JSON-constrained decoding keeps even a random-weight model's output parseable."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from serve_util import ServerThread
from tiny import make_tiny_model

from pocketlm.errors import InvalidArgument
from pocketlm.serve.app import create_app
from pocketlm.serve.constrain import compile_schema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "member": {"type": "boolean"},
        "city": {"enum": ["Paris", "Berlin", "Rome"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "note": {"type": ["string", "null"]},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string"}},
            "required": ["zip"],
        },
    },
    "required": ["name", "age", "city", "tags", "address"],
}


def conforms(value, schema) -> bool:
    """A small checker for the subset of JSON Schema used here."""
    if "enum" in schema:
        return value in schema["enum"]
    types = schema.get("type")
    types = types if isinstance(types, list) else [types]
    checks = {
        "string": lambda v: isinstance(v, str),
        "null": lambda v: v is None,
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if not any(checks[t](value) for t in types):
        return False
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return (
            set(schema.get("required", [])) <= set(value)
            and set(value) <= set(props)
            and all(conforms(v, props[k]) for k, v in value.items())
        )
    if isinstance(value, list):
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", len(value))
        return lo <= len(value) <= hi and all(conforms(v, schema["items"]) for v in value)
    return True


@pytest.fixture(scope="module")
def server():
    app = create_app({"tiny": make_tiny_model(seed=5)}, max_batch=8)
    with ServerThread(app) as url:
        yield url


def test_json_object_always_parses(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    for max_tokens in (8, 40, 120):
        r = c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "JSON"}],
            response_format={"type": "json_object"},
            n=4,
            seed=1,
            temperature=1.0,
            max_tokens=max_tokens,
        )
        for choice in r.choices:
            assert isinstance(json.loads(choice.message.content), dict)
            assert choice.finish_reason == "stop"


def test_json_schema_output_parses_and_conforms(server):
    c = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a person"}],
        response_format=fmt,
        n=6,
        seed=3,
        temperature=1.0,
        max_tokens=160,
    )
    for choice in r.choices:
        value = json.loads(choice.message.content)
        assert conforms(value, PERSON), value
    # streaming goes through the same constraint
    stream = c.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "a"}],
        response_format=fmt,
        stream=True,
        seed=4,
        max_tokens=160,
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert conforms(json.loads(text), PERSON)


def test_unsupported_schemas_are_refused_not_ignored(server):
    for schema, word in [
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x"}}}, "pattern"),
        ({"type": "string"}, "root"),
        ({"type": "object", "properties": {}, "required": ["b"]}, "required"),
        ({"$ref": "#/defs/x"}, "$ref"),
    ]:
        r = httpx.post(
            server + "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
            },
        )
        assert r.status_code == 400 and word in r.json()["error"]["message"]


def test_grammar_budget_is_exact_for_small_schemas():
    g = compile_schema(
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"enum": ["xy", 3]}},
            "required": ["a", "b"],
        }
    )
    assert g.minlen[g.root] == len('{"a":0,"b":3}')
    stack = g.start()
    for ch in '{"b":':
        stack = g.feed(stack, ch)
    assert g.min_chars(stack) == len('3,"a":0}')
    assert g.feed(stack, "4") is None and g.feed(stack, '"') is not None
    with pytest.raises(InvalidArgument, match="same character"):
        compile_schema(
            {
                "type": "object",
                "properties": {"x": {"anyOf": [{"type": "integer"}, {"type": "number"}]}},
            }
        )
