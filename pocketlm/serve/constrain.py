"""JSON-constrained decoding: a token mask that keeps the output a valid JSON value.

``response_format={"type": "json_object"}`` or ``{"type": "json_schema", ...}`` turns each
sequence's sampling into sampling among the tokens that keep its text a prefix of a JSON
value the grammar accepts. How:

1. Every token's decoded text is computed once per tokenizer (tokens that are partial UTF-8
   or special are never allowed, except the stop tokens once the value is complete).
2. A small pushdown automaton over characters (``feed``) tracks where we are in the value:
   a stack of frames ("val", "obj", "arr", "str", "num", "lit"), each a hashable tuple.
3. For a state, the allowed tokens are those whose every character the automaton accepts,
   found by walking a trie of the vocabulary (dead prefixes prune whole subtrees); inside a
   string, where nearly every token is fine, a precomputed "plain text" mask is used and only
   tokens containing ``"`` or ``\\`` are simulated. Masks are cached per state.
4. Budget: ``min_chars(state)`` is the fewest characters that complete the value. A token
   is only allowed if the value can still be closed within the tokens left (every
   structural character is a single token in byte-level vocabularies), so the output parses
   even when ``max_tokens`` runs out -- a random-weight model included.

JSON Schema support (anything else is refused with HTTP 400, never ignored): ``type``
object / array / string / number / integer / boolean / null (or a list of them), object
``properties`` + ``required`` (only declared properties are generated, in any order, each at
most once; without ``properties`` any keys), ``additionalProperties`` (only declared ones are
generated either way), array ``items`` + ``minItems``/``maxItems``, ``enum``, ``const``,
``anyOf`` whose alternatives begin with different characters, and annotations (``title``,
``description``, ``default``, ``examples``, ``$schema``). Root: an object or an array.
Enum/const values are written in compact JSON (``json.dumps(v, separators=(",", ":"))``).

Limits: the guarantee needs ``max_tokens`` at least the shortest valid value (else the reply
ends cut, finish_reason "length"); a ``stop`` string the client adds can still cut the value;
characters inside strings come from whole-character tokens only (a token that is a partial
UTF-8 sequence is never allowed).
"""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch

from pocketlm.errors import InvalidArgument

WS = " \t\n\r"
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"
MAX_WS_RUN = 24  # whitespace characters allowed in a row (keeps a wandering model moving)
INF = math.inf


# -- the grammar: schema -> nodes (referred to by index, so states hash fast) ---------------
@dataclass(frozen=True)
class Node:
    kind: str  # "any", "obj", "arr", "str", "num", "int", "lit", "union"
    props: tuple = ()  # obj: ((key json text, node index), ...)
    required: frozenset = frozenset()  # obj: key json texts
    free: bool = False  # obj: any keys with "any" values
    item: int = -1  # arr: node index of the items
    min_items: int = 0
    max_items: int | None = None
    options: tuple = ()  # lit: JSON texts; union: node indices


_ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "strict",
    "name",
}
_SUPPORTED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
} | _ANNOTATIONS
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


class Grammar:
    """A compiled schema: ``nodes[root]`` is the value to produce."""

    def __init__(self, schema: dict | None):
        self.nodes: list[Node] = []
        self.minlen: list[int] = []
        if schema is None:  # json_object: any object
            self.root = self._add(Node("obj", free=True))
        else:
            self.root = self._compile(schema, "schema")
            if self.nodes[self.root].kind not in ("obj", "arr"):
                raise InvalidArgument(
                    'response_format json_schema: the root must be {"type": "object"} (or an array)'
                )
        self._any, self._free_obj, self._any_arr  # noqa: B018 -- built now: no lazy writes later
        self._masks: dict = {}

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        self.minlen.append(self._minlen(node))
        return len(self.nodes) - 1

    def _minlen(self, n: Node) -> int:
        if n.kind == "obj":
            costs = [len(k) + 1 + self.minlen[v] for k, v in n.props if k in n.required]
            return 2 + sum(costs) + max(0, len(costs) - 1)
        if n.kind == "arr":
            return 2 + n.min_items * self.minlen[n.item] + max(0, n.min_items - 1)
        if n.kind == "lit":
            return min(len(o) for o in n.options)
        if n.kind == "union":
            return min(self.minlen[i] for i in n.options)
        return {"any": 1, "str": 2, "num": 1, "int": 1}[n.kind]

    def _compile(self, s, where: str) -> int:
        if s is True or s == {}:
            return self._add(Node("any"))
        if not isinstance(s, dict):
            raise InvalidArgument(f"response_format json_schema: {where} must be an object")
        unknown = sorted(set(s) - _SUPPORTED)
        if unknown:
            raise InvalidArgument(
                f"response_format json_schema: {where} uses {unknown}, which pocketlm cannot "
                "enforce while decoding; supported: type, properties, required, "
                "additionalProperties, items, minItems, maxItems, enum, const, anyOf"
            )
        if "const" in s or "enum" in s:
            values = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(values, list) or not values:
                raise InvalidArgument(
                    f"response_format json_schema: {where}.enum must be a non-empty list"
                )
            texts = tuple(
                dict.fromkeys(
                    json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in values
                )
            )
            return self._add(Node("lit", options=texts))
        if "anyOf" in s:
            alts = s["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise InvalidArgument(
                    f"response_format json_schema: {where}.anyOf must be a non-empty list"
                )
            return self._union(
                [self._compile(a, f"{where}.anyOf[{i}]") for i, a in enumerate(alts)], where
            )
        t = s.get("type")
        if t is None:
            return self._add(Node("any"))
        if isinstance(t, list):
            return self._union([self._compile({**s, "type": x}, where) for x in t], where)
        if t not in _TYPES:
            raise InvalidArgument(
                f"response_format json_schema: {where}.type {t!r} is not one of {sorted(_TYPES)}"
            )
        if t == "object":
            props = s.get("properties")
            required = s.get("required", [])
            if props is None:
                if s.get("additionalProperties") is False:
                    return self._add(Node("obj"))
                return self._add(Node("obj", free=True))
            if not isinstance(props, dict) or not isinstance(required, list):
                raise InvalidArgument(
                    f"response_format json_schema: {where}.properties must be "
                    "an object and required a list"
                )
            missing = [r for r in required if r not in props]
            if missing:
                raise InvalidArgument(
                    f"response_format json_schema: {where}.required names "
                    f"{missing}, which are not in properties"
                )
            compiled = tuple(
                (json.dumps(k, ensure_ascii=False), self._compile(v, f"{where}.properties.{k}"))
                for k, v in props.items()
            )
            req = frozenset(json.dumps(k, ensure_ascii=False) for k in required)
            return self._add(Node("obj", props=compiled, required=req))
        if t == "array":
            item = self._compile(s.get("items", {}), f"{where}.items")
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if (
                not isinstance(lo, int)
                or lo < 0
                or hi is not None
                and (not isinstance(hi, int) or hi < max(lo, 1))
            ):
                raise InvalidArgument(
                    f"response_format json_schema: {where} has bad minItems/maxItems"
                )
            return self._add(Node("arr", item=item, min_items=lo, max_items=hi))
        if t == "boolean":
            return self._add(Node("lit", options=("true", "false")))
        if t == "null":
            return self._add(Node("lit", options=("null",)))
        return self._add(Node({"string": "str", "number": "num", "integer": "int"}[t]))

    def _union(self, members: list[int], where: str) -> int:
        seen: set[str] = set()
        for m in members:
            starts = self._starts(m)
            if starts & seen:
                raise InvalidArgument(
                    f"response_format json_schema: the alternatives at {where} can begin with "
                    "the same character, which pocketlm's decoder cannot tell apart; make them "
                    "different types"
                )
            seen |= starts
        return self._add(Node("union", options=tuple(members)))

    def _starts(self, i: int) -> set[str]:
        n = self.nodes[i]
        if n.kind == "any":
            return set('{["-tfn' + DIGITS)
        if n.kind == "union":
            return set().union(*(self._starts(m) for m in n.options))
        if n.kind == "lit":
            return {o[0] for o in n.options}
        return {"obj": {"{"}, "arr": {"["}, "str": {'"'}}.get(n.kind, set("-" + DIGITS))

    # -- the automaton ------------------------------------------------------------------
    def start(self) -> tuple:
        return (("val", self.root),)

    def feed(self, stack: tuple, ch: str) -> tuple | None:
        """The stack after one more character, or None if ``ch`` cannot come next."""
        if not stack:
            return None
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind == "str":
            esc = top[1]
            if esc == 0:
                if ch == '"':
                    return self._complete(rest, None)
                if ch == "\\":
                    return rest + (("str", 1),)
                return stack if ord(ch) >= 0x20 else None
            if esc == 1:
                if ch in '"\\/bfnrt':
                    return rest + (("str", 0),)
                return rest + (("str", 5),) if ch == "u" else None
            if ch not in HEX:
                return None
            return rest + (("str", esc - 1 if esc > 2 else 0),)
        if kind == "val":
            if ch in WS:
                return stack
            return self._begin(rest, top[1], ch)
        if kind == "lit":
            _, options, i = top
            left = tuple(o for o in options if len(o) > i and o[i] == ch)
            if not left:
                if any(len(o) == i for o in options):  # an unquoted literal ended: re-feed ch
                    return self.feed(self._complete(rest, None), ch)
                return None
            if len(left) == 1 and len(left[0]) == i + 1 and left[0][-1] in '"]}':
                return self._complete(rest, json.loads(left[0]))
            return rest + (("lit", left, i + 1),)
        if kind == "num":
            _, integer, phase = top
            nxt = _num_step(phase, ch, integer)
            if nxt is not None:
                return rest + (("num", integer, nxt),)
            if phase in (2, 3, 5, 8):  # a whole number ended: the parent takes ch
                return self.feed(self._complete(rest, None), ch)
            return None
        if kind == "arr":
            _, ni, phase, count = top
            n = self.nodes[ni]
            if ch in WS:
                return stack
            if phase == "first":
                if ch == "]":
                    return self._complete(rest, None) if n.min_items == 0 else None
                return self._begin(rest + (("arr", ni, "after", self._count(n, 1)),), n.item, ch)
            if ch == "]" and count >= n.min_items:
                return self._complete(rest, None)
            if ch == "," and (n.max_items is None or count < n.max_items):
                return rest + (("arr", ni, "after", self._count(n, count + 1)), ("val", n.item))
            return None
        if kind == "obj":
            _, ni, phase, seen, key = top
            n = self.nodes[ni]
            if ch in WS and phase != "keyed":
                return stack
            if phase in ("first", "key") and ch == '"':
                parent = rest + (("obj", ni, "keyed", seen, None),)
                if n.free:
                    return parent + (("str", 0),)
                left = tuple(k for k, _ in n.props if k not in seen)
                return parent + (("lit", left, 1),) if left else None
            if ch == "}" and phase in ("first", "after") and n.required <= seen:
                return self._complete(rest, None)
            if phase == "after" and ch == ",":
                if not n.free and all(k in seen for k, _ in n.props):
                    return None
                return rest + (("obj", ni, "key", seen, None),)
            if phase == "colon" and ch == ":":
                value = self._value_of(n, key)
                return rest + (("obj", ni, "after", seen, None), ("val", value))
            return None
        raise AssertionError(kind)

    def _begin(self, stack: tuple, ni: int, ch: str) -> tuple | None:
        n = self.nodes[ni]
        k = n.kind
        if k == "union":
            for m in n.options:
                if ch in self._starts(m):
                    return self._begin(stack, m, ch)
            return None
        if k == "any":
            if ch == "{":
                return stack + (("obj", self._free_obj, "first", frozenset(), None),)
            if ch == "[":
                return stack + (("arr", self._any_arr, "first", 0),)
            if ch == '"':
                return stack + (("str", 0),)
            if ch in "tfn":
                return self.feed(stack + (("lit", ("true", "false", "null"), 0),), ch)
            return self.feed(stack + (("num", False, 0),), ch)
        if k == "obj":
            return stack + (("obj", ni, "first", frozenset(), None),) if ch == "{" else None
        if k == "arr":
            return stack + (("arr", ni, "first", 0),) if ch == "[" else None
        if k == "str":
            return stack + (("str", 0),) if ch == '"' else None
        if k in ("num", "int"):
            nxt = _num_step(0, ch, k == "int")
            return stack + (("num", k == "int", nxt),) if nxt is not None else None
        if k == "lit":
            return self.feed(stack + (("lit", n.options, 0),), ch)
        raise AssertionError(k)

    def _complete(self, rest: tuple, result) -> tuple:
        """The value on top finished; a parent waiting for a key records it."""
        if rest and rest[-1][0] == "obj" and rest[-1][2] == "keyed":
            _, ni, _, seen, _ = rest[-1]
            key = json.dumps(result, ensure_ascii=False) if result is not None else None
            return rest[:-1] + (("obj", ni, "colon", seen | {key} if key else seen, key),)
        return rest

    def _value_of(self, n: Node, key: str | None) -> int:
        if n.free:
            return self._any
        return next(v for k, v in n.props if k == key)

    @staticmethod
    def _count(n: Node, count: int) -> int:
        # only arrays with item limits need the count in their state (fewer states to cache)
        return count if n.min_items or n.max_items is not None else 0

    # shared helper nodes for "any" values
    @property
    def _any(self) -> int:
        return self._helper("any", Node("any"))

    @property
    def _free_obj(self) -> int:
        return self._helper("obj", Node("obj", free=True))

    @property
    def _any_arr(self) -> int:
        return self._helper("arr", Node("arr", item=self._any))

    def _helper(self, name: str, node: Node) -> int:
        cache = self.__dict__.setdefault("_helpers", {})
        if name not in cache:
            cache[name] = self._add(node)
        return cache[name]

    # -- the budget ---------------------------------------------------------------------
    def min_chars(self, stack: tuple) -> int:
        """The fewest characters that complete the value from ``stack``."""
        total, i = 0, len(stack) - 1
        while i >= 0:
            f = stack[i]
            kind = f[0]
            if kind == "val":
                total += self.minlen[f[1]]
            elif kind == "str":
                esc = f[1]
                total += 1 if esc == 0 else 2 if esc == 1 else esc - 1 + 1
                if i > 0 and stack[i - 1][2:3] == ("keyed",):  # a free object's key
                    total += 1 + 1 + 1  # ':' '0' '}'
                    i -= 1
            elif kind == "lit":
                _, options, k = f
                if i > 0 and stack[i - 1][0] == "obj" and stack[i - 1][2] == "keyed":
                    _, ni, _, seen, _ = stack[i - 1]
                    n = self.nodes[ni]
                    vals = dict(n.props)
                    total += min(
                        len(o) - k + 1 + self.minlen[vals[o]] + self._after_cost(n, seen | {o})
                        for o in options
                    )
                    i -= 1
                else:
                    total += min(len(o) - k for o in options)
            elif kind == "num":
                total += 0 if f[2] in (2, 3, 5, 8) else 1
            elif kind == "arr":
                _, ni, phase, count = f
                n = self.nodes[ni]
                if phase == "first":
                    total += self.minlen[ni] - 1
                else:
                    more = max(0, n.min_items - count)
                    total += more * (1 + self.minlen[n.item]) + 1
            elif kind == "obj":
                _, ni, phase, seen, key = f
                n = self.nodes[ni]
                if phase == "first":
                    total += self.minlen[ni] - 1 if not seen else self._after_cost(n, seen)
                elif phase == "after":
                    total += self._after_cost(n, seen)
                elif phase == "colon":
                    total += 1 + self.minlen[self._value_of(n, key)] + self._after_cost(n, seen)
                elif phase == "key":
                    if n.free:
                        total += 5  # "":0}
                    else:
                        total += self._key_cost(n, seen)
            i -= 1
        return total

    def _after_cost(self, n: Node, seen: frozenset) -> int:
        """Characters to close an object after a value: remaining required keys, then '}'."""
        return (
            sum(
                1 + len(k) + 1 + self.minlen[v]
                for k, v in n.props
                if k in n.required and k not in seen
            )
            + 1
        )

    def _key_cost(self, n: Node, seen: frozenset) -> int:
        need = [(k, v) for k, v in n.props if k in n.required and k not in seen]
        if need:  # after a ',': one required pair without its comma, the rest with theirs
            return self._after_cost(n, seen) - 1
        return min(len(k) + 1 + self.minlen[v] for k, v in n.props if k not in seen) + 1


def _num_step(phase: int, ch: str, integer: bool) -> int | None:
    """JSON number DFA: 0 start, 1 '-', 2 leading 0, 3 int digits, 4 '.', 5 fraction,
    6 'e', 7 exponent sign, 8 exponent digits. Ends are allowed in 2, 3, 5, 8."""
    d = ch in DIGITS
    if phase == 0:
        return 1 if ch == "-" else 2 if ch == "0" else 3 if d else None
    if phase == 1:
        return 2 if ch == "0" else 3 if d else None
    if phase in (2, 3):
        if phase == 3 and d:
            return 3
        if integer:
            return None
        return 4 if ch == "." else 6 if ch in "eE" else None
    if phase in (4, 5):
        if d:
            return 5
        return 6 if phase == 5 and ch in "eE" else None
    if phase == 6:
        return 7 if ch in "+-" else 8 if d else None
    if phase in (7, 8):
        return 8 if d else None
    return None


def compile_schema(schema: dict | None) -> Grammar:
    """A Grammar for ``schema`` (None: any JSON object). Raises InvalidArgument naming the
    unsupported keyword or the malformed part.

    The same schema gives the same Grammar object (its token masks are cached on it, so a
    schema a client sends again and again gets cheaper)."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        raise InvalidArgument("response_format json_schema: the schema is not plain JSON") from None
    return _compiled(key)


@functools.lru_cache(maxsize=64)
def _compiled(key: str) -> Grammar:
    return Grammar(json.loads(key))


# -- the vocabulary side --------------------------------------------------------------------
class Vocabulary:
    """Each token's text, a trie over them, and which tokens are plain string content."""

    def __init__(self, tokenizer, vocab_size: int):
        self.size = vocab_size
        self.stop_ids = sorted(i for i in tokenizer.stop_ids if i < vocab_size)
        special = set(self.stop_ids)
        try:
            special |= {i for i in tokenizer.backend.get_added_tokens_decoder() if i < vocab_size}
        except AttributeError:
            pass
        self.texts: list[str | None] = []
        for i in range(vocab_size):
            t = tokenizer.token_text(i) if i not in special else None
            self.texts.append(t if t and "\ufffd" not in t else None)
        plain = torch.zeros(vocab_size, dtype=torch.bool)
        self.quoting: list[int] = []  # tokens with '"' or '\\': simulated inside strings
        self.trie: dict = {}
        for i, t in enumerate(self.texts):
            if t is None:
                continue
            if '"' in t or "\\" in t:
                self.quoting.append(i)
            elif all(ord(c) >= 0x20 for c in t):
                plain[i] = True
            node = self.trie
            for c in t:
                node = node.setdefault(c, {})
            node.setdefault(None, []).append(i)
        self.plain = plain


class JsonConstraint:
    """The per-sequence state of JSON-constrained decoding (see the module docstring)."""

    _vocabularies: ClassVar[dict] = {}

    @classmethod
    def vocabulary(cls, tokenizer, vocab_size: int) -> Vocabulary:
        """The (cached) Vocabulary of a tokenizer; the first call takes a moment."""
        key = (id(tokenizer), vocab_size)
        if key not in cls._vocabularies:
            cls._vocabularies[key] = Vocabulary(tokenizer, vocab_size)
        return cls._vocabularies[key]

    def __init__(self, grammar: Grammar, vocab: Vocabulary):
        self.grammar, self.vocab = grammar, vocab
        self.stack = grammar.start()
        self.ws = 0  # whitespace characters in a row
        self.cache: OrderedDict = grammar._masks.setdefault(id(vocab), OrderedDict())

    @property
    def complete(self) -> bool:
        return not self.stack

    @property
    def text_ok(self) -> bool:  # for tests
        return self.stack is not None

    def allowed(self, remaining: int) -> torch.Tensor:
        """Tokens (V,) bool that keep the text a valid prefix closable in ``remaining`` tokens
        (this one included)."""
        need = self._need((self.stack, self.ws))
        ok = need <= remaining - 1
        if not ok.any():  # the budget is already too small to close: get as close as we can
            best = need.min()
            if math.isinf(best):  # nothing fits the grammar at all (cannot happen for JSON)
                ok = torch.zeros_like(ok)
                ok[self.vocab.stop_ids] = True
            else:
                ok = need == best
        return ok

    def advance(self, token_id: int) -> None:
        if token_id in self.vocab.stop_ids:
            return
        state = self._run((self.stack, self.ws), self.vocab.texts[token_id] or "")
        if state is None:
            raise AssertionError(f"token {token_id} was not allowed by the JSON grammar")
        self.stack, self.ws = state

    # -- masks ----------------------------------------------------------------------------
    def _step(self, state, ch):
        stack, ws = state
        if not stack:  # the value is complete: trailing whitespace only
            return (stack, ws + 1) if ch in WS and ws < MAX_WS_RUN else None
        in_text = stack[-1][0] in ("str", "lit")
        if ch in WS and not in_text:
            if ws >= MAX_WS_RUN or stack[-1][0] == "val" and len(stack) == 1:  # no leading space
                return None
                return None
            nxt = self.grammar.feed(stack, ch)
            return (nxt, ws + 1) if nxt is not None else None
        nxt = self.grammar.feed(stack, ch)
        return (nxt, 0) if nxt is not None else None

    def _run(self, state, text: str):
        for ch in text:
            state = self._step(state, ch)
            if state is None:
                return None
        return state

    def _need(self, state) -> torch.Tensor:
        """(V,) float: min_chars after each token, inf where the token is not allowed."""
        if state in self.cache:
            self.cache.move_to_end(state)
            return self.cache[state]
        g, v = self.grammar, self.vocab
        need = torch.full((v.size,), INF)
        stack = state[0]
        if not stack:
            need[v.stop_ids] = 0
        elif stack[-1] == ("str", 0):
            need[v.plain] = g.min_chars(stack)  # plain text keeps us inside the string
            for i in v.quoting:
                after = self._run(state, v.texts[i])
                if after is not None:
                    need[i] = g.min_chars(after[0])
        else:
            todo = [(v.trie, state)]
            while todo:
                node, st = todo.pop()
                for c, child in node.items():
                    if c is None:
                        continue
                    nxt = self._step(st, c)
                    if nxt is None:
                        continue
                    ids = child.get(None)
                    if ids:
                        need[ids] = g.min_chars(nxt[0])
                    todo.append((child, nxt))
        self.cache[state] = need
        if len(self.cache) > 2048:
            self.cache.popitem(last=False)
        return need
