"""Training data: read text, JSONL or CSV; split off a held-out set; tokenize; pack.

Three kinds of record, whatever the file type:

- ``text``: a document; every token is a training target.
- ``instruction``: a prompt and a response; rendered with the model's chat template as one
  user turn and one assistant turn, and only the response (with its end-of-turn token) is a
  target.
- ``chat``: a list of ``{"role", "content"}`` messages; only the assistant turns are targets.

Response-only masks are exact: the conversation is rendered once, the character span of each
assistant turn is found by rendering the prefix before it (with the generation prompt) and the
prefix through it, and a token is a target when its first character lies inside such a span.

The held-out split is made over records (documents, rows), before packing, by a seeded shuffle
(``split_seed``, default 0), so the same file and seed always give the same split. Packing
concatenates the records of a split into one token stream and cuts it into rows of
``seq_len + 1`` tokens that overlap by one token, so every token but the first is predicted
exactly once. Records may share a row (attention is not blocked between them, as in most
packed pre-training); ``pack=False`` gives each record its own padded row instead.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pocketlm.errors import InvalidArgument, PocketError
from pocketlm.model.tokenizer import Tokenizer

FORMATS = ("text", "instruction", "chat")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "input", "query")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")
TEXT_COLUMNS = ("text", "content")
DEFAULT_SPLIT_SEED = 0


class DataError(PocketError):
    """A data file that is empty, lacks the needed columns, or has malformed rows."""


@dataclass
class Encoded:
    """One record as token ids; ``target[j]`` says whether token j is a training target."""

    ids: list[int]
    target: list[bool]


@dataclass
class Blocks:
    """Packed training rows: tokens and target masks, each (N, seq_len + 1).

    Row i predicts ``tokens[i, 1:]`` from ``tokens[i, :-1]``; ``mask[i, 1:]`` says which of
    those predictions count.
    """

    tokens: torch.Tensor  # (N, L+1) long
    mask: torch.Tensor  # (N, L+1) bool

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1] - 1

    @property
    def n_targets(self) -> int:
        return int(self.mask[:, 1:].sum())

    def fingerprint(self) -> str:
        """sha256 of tokens and mask: identifies the data a checkpoint or cache belongs to."""
        h = hashlib.sha256()
        h.update(self.tokens.numpy().tobytes())
        h.update(self.mask.numpy().tobytes())
        return h.hexdigest()[:16]

    def head(self, n: int) -> Blocks:
        return Blocks(self.tokens[:n], self.mask[:n])


# -- reading files ------------------------------------------------------------------------
def read_records(
    path: str | Path,
    format: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    text_column: str | None = None,
) -> tuple[str, list[dict]]:
    """Read one file into records; returns (format, records).

    Records are ``{"text"}``, ``{"prompt", "response"}`` or ``{"messages"}``. The format is
    taken from ``format`` or guessed from the file (``.txt``/``.md`` -> text; JSONL keys; CSV
    header). Raises DataError for a missing or empty file, missing columns (naming those
    found) and malformed rows (with their count and the first one).
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if not raw.strip():
        raise DataError(f"{path} is empty; give a file with at least one record")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path, raw, format, prompt_column, response_column, text_column)
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, raw, format, prompt_column, response_column, text_column)
    if format not in (None, "text"):
        raise DataError(
            f"{path} is plain text, which holds documents only; --format {format} needs a "
            ".jsonl or .csv file with prompt/response columns or messages"
        )
    return "text", _text_documents(raw)


def _text_documents(raw: str) -> list[dict]:
    # Documents are separated by blank lines.
    docs = [d.strip("\n") for d in re.split(r"\n\s*\n", raw.replace("\r\n", "\n"))]
    return [{"text": d} for d in docs if d.strip()]


def _pick(available: list[str], wanted: str | None, defaults: tuple[str, ...]) -> str | None:
    if wanted is not None:
        return wanted if wanted in available else None
    return next((c for c in defaults if c in available), None)


def _columns_for(path, fmt, available, prompt_column, response_column, text_column):
    """(format, {role: column}) for a table or JSON object with keys ``available``."""
    where = f"{path}: "
    found = ", ".join(map(repr, available)) or "none"
    p = _pick(available, prompt_column, PROMPT_COLUMNS)
    r = _pick(available, response_column, RESPONSE_COLUMNS)
    t = _pick(available, text_column, TEXT_COLUMNS)
    if fmt is None and (prompt_column or response_column):
        fmt = "instruction"  # columns named by the user say what they want
    if fmt is None and text_column:
        fmt = "text"
    if fmt is None:
        fmt = (
            "chat"
            if "messages" in available
            else "instruction"
            if p and r
            else "text"
            if t
            else None
        )
        if fmt is None:
            raise DataError(
                f"{where}cannot tell the format: no 'messages', no prompt/response pair "
                f"({'/'.join(PROMPT_COLUMNS)} + {'/'.join(RESPONSE_COLUMNS)}) and no text column "
                f"({'/'.join(TEXT_COLUMNS)}); columns found: {found}. Name them with "
                "--prompt-column/--response-column or --text-column"
            )
    if fmt == "instruction":
        missing = [
            f"{role} column {name!r}" if name else f"a {role} column ({'/'.join(defaults)})"
            for role, name, got, defaults in (
                ("prompt", prompt_column, p, PROMPT_COLUMNS),
                ("response", response_column, r, RESPONSE_COLUMNS),
            )
            if got is None
        ]
        if missing:
            raise DataError(f"{where}missing {' and '.join(missing)}; columns found: {found}")
        return fmt, {"prompt": p, "response": r}
    if fmt == "text":
        if t is None:
            raise DataError(
                f"{where}missing the text column {text_column or '/'.join(TEXT_COLUMNS)!r}; "
                f"columns found: {found}"
            )
        return fmt, {"text": t}
    if "messages" not in available:
        raise DataError(f"{where}--format chat needs a 'messages' field; fields found: {found}")
    return fmt, {"messages": "messages"}


def _malformed(path: Path, bad: list[tuple[int, str]], total: int, unit: str) -> DataError:
    line, why = bad[0]
    return DataError(
        f"{path}: {len(bad)} of {total} {unit}s are malformed; the first is {unit} {line}: {why}. "
        "Fix or remove them and run again"
    )


def _read_jsonl(path, raw, fmt, prompt_column, response_column, text_column):
    objects, bad = [], []
    lines = [(i + 1, s) for i, s in enumerate(raw.splitlines()) if s.strip()]
    if path.suffix.lower() == ".json" and raw.lstrip().startswith("["):
        try:
            lines = [(i + 1, json.dumps(o)) for i, o in enumerate(json.loads(raw))]
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON: {e}") from None
    for n, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((n, f"not valid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            bad.append((n, f"a JSON {type(obj).__name__}, not an object"))
            continue
        objects.append((n, obj))
    if not objects:
        raise _malformed(path, bad, len(lines), "line")
    fmt, cols = _columns_for(
        path, fmt, list(objects[0][1]), prompt_column, response_column, text_column
    )
    records = []
    for n, obj in objects:
        rec, why = _record(fmt, cols, obj)
        if why:
            bad.append((n, why))
        else:
            records.append(rec)
    if bad:
        raise _malformed(path, sorted(bad), len(lines), "line")
    return fmt, records


def _read_csv(path, raw, fmt, prompt_column, response_column, text_column):
    if fmt == "chat":
        raise DataError(f"{path}: --format chat needs JSONL with a 'messages' list per line")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter=delimiter)
    available = [c for c in (reader.fieldnames or []) if c]
    fmt, cols = _columns_for(path, fmt, available, prompt_column, response_column, text_column)
    records, bad, total = [], [], 0
    for i, row in enumerate(reader):
        total += 1
        if None in row or any(v is None for v in row.values()):
            n = sum(v is not None for k, v in row.items() if k is not None)
            bad.append(
                (
                    i + 1,
                    f"it has {n + len(row.get(None) or [])} fields, not {len(available)}",
                )
            )
            continue
        rec, why = _record(fmt, cols, row)
        if why:
            bad.append((i + 1, why))
        else:
            records.append(rec)
    if not total:
        raise DataError(f"{path} has a header but no rows")
    if bad:
        raise _malformed(path, bad, total, "row")
    return fmt, records


def _record(fmt: str, cols: dict, obj: dict) -> tuple[dict | None, str | None]:
    """A record from one row/object, or (None, why it is malformed)."""
    if fmt == "chat":
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return None, "'messages' is not a non-empty list"
        for m in msgs:
            if not (
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                return None, f"message {m!r} lacks a string 'role' and 'content'"
        if not any(m["role"] == "assistant" for m in msgs):
            return None, "no assistant message, so nothing to learn"
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}, None
    rec = {}
    for role, col in cols.items():
        v = obj.get(col)
        if not isinstance(v, str) or not v.strip():
            return None, f"{col!r} is empty or missing"
        rec[role] = v.replace("\r\n", "\n")
    return rec, None


# -- tokenizing ---------------------------------------------------------------------------
def encode_chat(messages: list[dict], tokenizer: Tokenizer) -> Encoded:
    """Token ids of a conversation, with only the assistant turns as targets.

    Raises InvalidArgument when the template renders prefixes inconsistently (then the
    assistant spans cannot be found exactly).
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise InvalidArgument(
                "the chat template does not render a conversation's prefixes as prefixes of the "
                "whole, so the assistant turns cannot be located; use --format text instead"
            )
        spans.append((len(before), len(through)))
    enc = tokenizer.backend.encode(full, add_special_tokens=False)
    ids, target = list(enc.ids), [any(s <= a < e for s, e in spans) for a, _ in enc.offsets]
    if (
        tokenizer.add_bos
        and tokenizer.bos_id is not None
        and not full.startswith(tokenizer.bos_token or "\0")
    ):
        ids, target = [tokenizer.bos_id] + ids, [False] + target
    return Encoded(ids, target)


def encode_record(record: dict, tokenizer: Tokenizer) -> Encoded:
    """One record -> ids and target mask (see the module docstring for what is a target)."""
    if "messages" in record:
        return encode_chat(record["messages"], tokenizer)
    if "prompt" in record:
        if tokenizer.has_chat_template:
            return encode_chat(
                [
                    {"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]},
                ],
                tokenizer,
            )
        prompt = tokenizer.encode(record["prompt"] + "\n")
        response = tokenizer.encode(record["response"], add_bos=False) + _eos(tokenizer)
        return Encoded(prompt + response, [False] * len(prompt) + [True] * len(response))
    ids = tokenizer.encode(record["text"]) + _eos(tokenizer)
    return Encoded(ids, [True] * len(ids))


def _eos(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else []


def pack(examples: list[Encoded], seq_len: int, pad_id: int = 0) -> Blocks:
    """Concatenate and cut into rows of seq_len+1 tokens overlapping by one (see module doc)."""
    ids = [i for e in examples for i in e.ids]
    tgt = [t for e in examples for t in e.target]
    n_rows = max(1, -(-(len(ids) - 1) // seq_len))
    tokens = torch.full((n_rows, seq_len + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((n_rows, seq_len + 1), dtype=torch.bool)
    ids_t, tgt_t = torch.tensor(ids, dtype=torch.long), torch.tensor(tgt, dtype=torch.bool)
    for r in range(n_rows):
        piece = slice(r * seq_len, min(r * seq_len + seq_len + 1, len(ids)))
        n = piece.stop - piece.start
        tokens[r, :n] = ids_t[piece]
        mask[r, 1:n] = tgt_t[piece][1:]
    return Blocks(tokens, mask)


def pad_rows(examples: list[Encoded], seq_len: int, pad_id: int = 0) -> Blocks:
    """One row per record, truncated to seq_len+1 tokens and padded (no packing)."""
    tokens = torch.full((len(examples), seq_len + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), seq_len + 1), dtype=torch.bool)
    for r, e in enumerate(examples):
        n = min(len(e.ids), seq_len + 1)
        tokens[r, :n] = torch.tensor(e.ids[:n])
        mask[r, 1:n] = torch.tensor(e.target[1:n], dtype=torch.bool)
    return Blocks(tokens, mask)


def split(records: list, held_out: float, seed: int = DEFAULT_SPLIT_SEED) -> tuple[list, list]:
    """(train, held_out) by a seeded shuffle of record indices; order within each kept."""
    if not 0 <= held_out < 1:
        raise InvalidArgument(f"held-out fraction must be in [0, 1), got {held_out}")
    if held_out == 0:
        return records, []
    if len(records) < 2:
        raise DataError(
            f"only {len(records)} record(s); a held-out split needs at least 2 (give more data, "
            "blank-line separated documents, or --held-out 0 with --eval-data FILE)"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(held_out * len(records)))
    held = sorted(order[:n_held])
    held_set = set(held)
    return [r for i, r in enumerate(records) if i not in held_set], [records[i] for i in held]


@dataclass
class Data:
    train: Blocks
    held_out: Blocks | None
    info: dict


def load_data(
    paths: list[str | Path] | str | Path,
    tokenizer: Tokenizer,
    seq_len: int = 256,
    format: str | None = None,
    held_out: float = 0.1,
    split_seed: int = DEFAULT_SPLIT_SEED,
    packed: bool = True,
    eval_paths: list[str | Path] | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    text_column: str | None = None,
) -> Data:
    """Read, split, tokenize and pack training data; see the module docstring.

    With ``eval_paths`` the held-out set is those files and nothing is split off. A text file
    that is one long document is first cut into seq_len-token pieces so it can be split.
    Raises DataError (files, columns, rows) and InvalidArgument (settings).
    """
    if seq_len < 2:
        raise InvalidArgument(f"seq_len must be at least 2, got {seq_len}")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise InvalidArgument("no data files given; pass --data FILE")
    cols = {
        "prompt_column": prompt_column,
        "response_column": response_column,
        "text_column": text_column,
    }

    def read_all(files):
        fmts, recs = set(), []
        for p in files:
            f, r = read_records(p, format, **cols)
            fmts.add(f)
            recs += r
        return fmts, recs

    fmts, records = read_all(paths)
    encoded = [encode_record(r, tokenizer) for r in records]
    if fmts == {"text"} and len(encoded) < 20 and held_out > 0 and not eval_paths:
        # one long document: split it into seq_len pieces so a held-out part exists
        ids = [i for e in encoded for i in e.ids]
        encoded = [
            Encoded(ids[i : i + seq_len], [True] * len(ids[i : i + seq_len]))
            for i in range(0, len(ids), seq_len)
        ]
    if eval_paths:
        _, eval_records = read_all(eval_paths)
        train_enc, held_enc = encoded, [encode_record(r, tokenizer) for r in eval_records]
    else:
        train_enc, held_enc = split(encoded, held_out, split_seed)
    if not any(any(e.target) for e in train_enc):
        raise DataError(f"{', '.join(map(str, paths))}: no training targets after tokenizing")
    build = pack if packed else pad_rows
    train = build(train_enc, seq_len)
    held = build(held_enc, seq_len) if held_enc else None
    info = {
        "files": [str(p) for p in paths],
        "format": "+".join(sorted(fmts)),
        "records": len(records),
        "train_records": len(train_enc),
        "held_out_records": len(held_enc),
        "split_seed": None if eval_paths else split_seed,
        "held_out_fraction": None if eval_paths else held_out,
        "seq_len": seq_len,
        "packed": packed,
        "train_rows": len(train),
        "train_target_tokens": train.n_targets,
        "held_out_target_tokens": held.n_targets if held is not None else 0,
    }
    return Data(train, held, info)
