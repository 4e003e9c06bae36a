"""Knowledge distillation: divergences, the teacher's top-k cache, and building a student.

Divergences compare the teacher's next-token distribution p with the student's q at every
target position, both at temperature T, on a common support: the whole vocabulary when the
teacher runs on the fly, or the teacher's top-k tokens when read from the cache, where both
teacher is renormalised over those k tokens; for forward KL the student keeps its full-vocabulary
log-probabilities at those ids (so the loss also pulls the student's mass into the teacher's
top-k; identical models give -log(student's top-k mass), 0 when k covers the vocabulary), for
the other divergences the student is renormalised over the k tokens too (0 for identical
models). The first version renormalised the student for forward KL as well, which left mass
outside the top-k unpenalised; see BENCHMARKS.md for the two measured side by side.

- ``forward``: KL(p || q), mean-seeking (Hinton et al.; DistillKit's default).
- ``reverse``: KL(q || p), mode-seeking (MiniLLM).
- ``symmetric``: (KL(p||q) + KL(q||p)) / 2.
- ``jsd``: Jensen-Shannon, KL(p||m)/2 + KL(q||m)/2 with m = (p + q)/2.

The distillation loss is ``kd_weight * T^2 * divergence + (1 - kd_weight) * cross-entropy``
(T^2 keeps gradient scales comparable across temperatures).

The cache holds, for every target position of the packed training rows the run reads (its
steps decide which: a short run on a big file reads few), the teacher's k likeliest token
ids (int32) and their log-probabilities (fp16) at T = 1, in one safetensors file with the
row indices, and the data's fingerprint, the teacher and the tokenizer in its metadata; a
longer run extends it with the rows it lacks. Any temperature is applied when it is read,
since softmax(z/T) over k tokens equals the renormalised exp(log p / T).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pocketlm.errors import InvalidArgument, PocketError
from pocketlm.model.config import ModelConfig
from pocketlm.train.data import Blocks
from pocketlm.train.trainer import TrainSettings, _Rows

LOSSES = ("forward", "reverse", "symmetric", "jsd")
PRESETS = {  # name -> (layers, width, heads, kv heads, SwiGLU width)
    "nano": (4, 256, 4, 2, 768),
    "micro": (6, 384, 6, 2, 1024),
    "mini": (10, 576, 9, 3, 1536),
}


class TokenizerMismatch(PocketError):
    """Teacher and student tokenize differently, so their distributions cannot be compared."""


# -- divergences --------------------------------------------------------------------------
def divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str = "forward"
) -> torch.Tensor:
    """Per-position divergence (...,) between log-distributions (..., K) on the same support."""
    if kind not in LOSSES:
        raise InvalidArgument(f"distillation loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    p, q = teacher_logp.exp(), student_logp.exp()
    if kind == "forward":
        return (p * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse":
        return (q * (student_logp - teacher_logp)).sum(-1)
    if kind == "symmetric":
        return 0.5 * ((p - q) * (teacher_logp - student_logp)).sum(-1)
    m_log = torch.logaddexp(teacher_logp, student_logp) - torch.log(torch.tensor(2.0))
    return 0.5 * (p * (teacher_logp - m_log)).sum(-1) + 0.5 * (q * (student_logp - m_log)).sum(-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    kind: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """T^2-scaled divergence per position (B, T).

    ``teacher`` is full logits (B, T, V), or a (log-probs, ids) pair (B, T, K) from the cache;
    in the second case the teacher is renormalised over the K ids (see the module docstring).
    """
    if temperature <= 0:
        raise InvalidArgument(f"temperature must be > 0, got {temperature}")
    s = student_logits.float() / temperature
    if isinstance(teacher, tuple):
        t_logp, ids = teacher
        t_logp = torch.log_softmax(t_logp.float() / temperature, dim=-1)
        if kind == "forward":
            # the student's full-vocabulary log-probs at the teacher's ids: the loss then also
            # pulls the student's mass into the teacher's top-k (a constant offset -log Z for
            # identical models, where Z is the student's top-k mass)
            s_logp = torch.log_softmax(s, dim=-1).gather(-1, ids.long())
        else:
            s_logp = torch.log_softmax(s.gather(-1, ids.long()), dim=-1)
    else:
        t_logp = torch.log_softmax(teacher.float() / temperature, dim=-1)
        s_logp = torch.log_softmax(s, dim=-1)
    return divergence(s_logp, t_logp, kind) * temperature**2


# -- the teacher cache --------------------------------------------------------------------
def tokenizer_digest(tokenizer) -> str:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


def rows_used(settings: TrainSettings, blocks: Blocks) -> torch.Tensor:
    """The sorted row indices (M,) a run with ``settings`` reads from ``blocks``.

    The trainer's rows are a pure function of the step (see ``trainer._Rows``), so a run
    whose steps draw fewer rows than the data holds reads the first ones of epoch 0's
    permutation; one that draws at least an epoch reads every row. A resumed run has the
    same steps (its checkpoint refuses others), hence the same rows.
    """
    n = len(blocks)
    steps = settings.resolve_steps(n, blocks.seq_len)
    draws = steps * settings.batch_size * settings.grad_accum
    if draws >= n:
        return torch.arange(n)
    return _Rows(n, settings.seed).take(0, draws).sort().values


@dataclass
class TeacherCache:
    """The teacher's top-k for some rows of the data: ``logprobs`` fp16 and ``ids`` int32
    (M, L, k) for the sorted row indices ``rows`` (M,)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    rows: torch.Tensor

    def covers(self, rows: torch.Tensor) -> bool:
        return bool(torch.isin(rows, self.rows).all())

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, ids) (B, L, k) for data rows (B,); KeyError names rows not cached."""
        at = torch.searchsorted(self.rows, rows).clamp(max=len(self.rows) - 1)
        missing = rows[self.rows[at] != rows]
        if len(missing):
            raise KeyError(f"teacher cache has no rows {missing.tolist()[:8]}")
        return self.logprobs[at], self.ids[at]


def _read_cache(path: Path, blocks: Blocks, meta: dict | None) -> TeacherCache | None:
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        info, names = f.metadata() or {}, f.keys()
        wanted = {"fingerprint": blocks.fingerprint(), **_strings(meta)}
        if any(info.get(a) != b for a, b in wanted.items()) or "rows" not in names:
            return None  # other data, teacher or k, or a cache from before rows were stored
        return TeacherCache(f.get_tensor("logprobs"), f.get_tensor("ids"), f.get_tensor("rows"))


def _strings(meta: dict | None) -> dict[str, str]:
    return {a: str(b) for a, b in (meta or {}).items()}


@torch.no_grad()
def build_cache(
    teacher: nn.Module,
    blocks: Blocks,
    k: int,
    path: str | Path,
    batch_size: int = 8,
    meta: dict | None = None,
    progress: bool = True,
    rows: torch.Tensor | None = None,
) -> Path:
    """Run the teacher over ``rows`` of ``blocks`` (default: all) and store its top-k
    log-probs; returns the path.

    Layout: ``logprobs`` fp16 (M, L, k) and ``ids`` int32 (M, L, k) for the sorted row
    indices ``rows`` int64 (M,), position j of cached row m being the teacher's distribution
    for predicting ``tokens[rows[m], j + 1]``. A cache already at ``path`` for the same data,
    k and ``meta`` is extended: the teacher runs only on the rows it lacks, and the rows it
    has are kept (so a cache built for a small budget grows for a larger one, and one built
    for a large budget serves a smaller one as it is). The file is written to a temporary
    name and renamed; Ctrl-C during the teacher's pass writes the rows finished so far
    before stopping, so the next build continues from them. Raises InvalidArgument for a k
    outside 1..vocab_size.
    """
    from tqdm.auto import tqdm

    if k < 1 or k > teacher.config.vocab_size:
        raise InvalidArgument(f"--top-k must be in 1..{teacher.config.vocab_size}, got {k}")
    path, meta = Path(path), {**(meta or {}), "k": k}
    want = torch.arange(len(blocks)) if rows is None else torch.unique(rows.long())
    have = _read_cache(path, blocks, meta)
    todo = want if have is None else want[~torch.isin(want, have.rows)]
    L = blocks.seq_len
    logprobs = torch.empty((len(todo), L, k), dtype=torch.float16)
    ids = torch.empty((len(todo), L, k), dtype=torch.int32)
    done = 0
    teacher.eval()
    try:
        for i in tqdm(
            range(0, len(todo), batch_size),
            desc="teacher top-k cache",
            unit="batch",
            disable=not progress,
        ):
            tok = blocks.tokens[todo[i : i + batch_size], :-1]
            logp = torch.log_softmax(teacher(tok).float(), dim=-1)  # (b, L, V)
            top = logp.topk(k, dim=-1)
            logprobs[i : i + batch_size] = top.values.half()
            ids[i : i + batch_size] = top.indices.int()
            done = min(len(todo), i + batch_size)
    finally:  # Ctrl-C or an error keeps the rows already computed
        if done:
            _write(path, blocks, meta, have, todo[:done], logprobs[:done], ids[:done])
    return path


def _write(path, blocks, meta, have, rows, logprobs, ids) -> None:
    """Merge new rows into ``have`` (sorted by row) and write atomically."""
    from safetensors.torch import save_file

    if have is not None:
        rows = torch.cat([have.rows, rows])
        logprobs = torch.cat([have.logprobs, logprobs])
        ids = torch.cat([have.ids, ids])
    order = rows.argsort()
    info = {"fingerprint": blocks.fingerprint(), **_strings(meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {"logprobs": logprobs[order], "ids": ids[order], "rows": rows[order]}
    save_file({a: t.contiguous() for a, t in tensors.items()}, str(tmp), metadata=info)
    os.replace(tmp, path)


def load_cache(
    path: str | Path,
    blocks: Blocks,
    meta: dict | None = None,
    rows: torch.Tensor | None = None,
) -> TeacherCache | None:
    """The cache at ``path`` if it was made for these blocks (and metadata) and holds every
    row in ``rows`` (default: all rows), else None (build_cache then fills in what lacks)."""
    cache = _read_cache(Path(path), blocks, meta)
    want = torch.arange(len(blocks)) if rows is None else rows.long()
    if cache is None or not cache.covers(want):
        return None
    return cache


class DistillObjective:
    """Per-token ``w * KD + (1 - w) * CE`` against a live teacher or the top-k cache."""

    def __init__(
        self,
        kind: str = "forward",
        kd_weight: float = 0.5,
        temperature: float = 1.0,
        teacher: nn.Module | None = None,
        cache: TeacherCache | None = None,
    ):
        if kind not in LOSSES:
            raise InvalidArgument(f"--loss must be one of {', '.join(LOSSES)}, got {kind!r}")
        if not 0 <= kd_weight <= 1:
            raise InvalidArgument(f"--kd-weight must be in [0, 1], got {kd_weight}")
        if teacher is None and cache is None and kd_weight > 0:
            raise InvalidArgument("distillation needs a teacher or a teacher cache")
        self.kind, self.w, self.T, self.teacher, self.cache = (
            kind,
            kd_weight,
            temperature,
            teacher,
            cache,
        )

    def __call__(self, network, inputs, targets, rows):
        logits = network(inputs)  # (B, T, V)
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="none"
        ).view(targets.shape)
        if self.w == 0:
            return ce, {"ce": ce}
        if self.cache is not None:
            teacher = self.cache.lookup(rows)
        else:
            with torch.no_grad():
                teacher = self.teacher(inputs)
        kd = kd_loss(logits, teacher, self.kind, self.T)
        return self.w * kd + (1 - self.w) * ce, {"ce": ce, "kd": kd}


# -- students -----------------------------------------------------------------------------
def evenly_spaced(n_keep: int, n_layers: int) -> list[int]:
    """``n_keep`` layer indices spread over 0..n_layers-1, first and last included."""
    if not 1 <= n_keep <= n_layers:
        raise InvalidArgument(f"cannot keep {n_keep} of {n_layers} layers")
    if n_keep == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (n_keep - 1)) for i in range(n_keep)})


NARROWING = ("heads", "mlp")  # structured-pruning units a from-teacher spec may narrow


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'from-teacher:10' (10 evenly spaced) or 'from-teacher:0,3,6' (those layers).

    Narrowing options (``mlp=0.25``) after the layers are ignored here; see parse_narrowing.
    """
    body = spec.split(":", 1)[1] if ":" in spec else ""
    body = ",".join(p for p in body.split(",") if "=" not in p)
    try:
        if "," in body:
            keep = sorted({int(x) for x in body.split(",") if x.strip()})
            bad = [i for i in keep if not 0 <= i < n_layers]
            if bad:
                raise InvalidArgument(
                    f"{spec}: layers {bad} do not exist; the teacher has layers 0..{n_layers - 1}"
                )
            return keep
        return evenly_spaced(int(body), n_layers)
    except ValueError:
        raise InvalidArgument(
            f"bad student spec {spec!r}; write from-teacher:N (N evenly spaced layers) or "
            "from-teacher:0,3,6 (those layers)"
        ) from None


def parse_narrowing(spec: str) -> dict[str, float]:
    """{'heads': 0.25, 'mlp': 0.5} from 'from-teacher:10,heads=0.25,mlp=0.5' (in that order).

    Each value is the fraction of that unit removed from every kept layer, as ``pocketlm
    prune --structured`` reads its ratio. Raises InvalidArgument for other keys or bad values.
    """
    body = spec.split(":", 1)[1] if ":" in spec else ""
    out = {}
    for part in (p.strip() for p in body.split(",") if "=" in p):
        key, _, value = part.partition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if key not in NARROWING or not 0 < ratio < 1:
            raise InvalidArgument(
                f"bad narrowing {part!r} in {spec!r}; write heads=R or mlp=R with R the fraction "
                "removed, in (0, 1), e.g. from-teacher:10,mlp=0.25"
            )
        out[key] = ratio
    return {k: out[k] for k in NARROWING if k in out}


def student_from_teacher(teacher_model, layers: list[int]):
    """A copy of the teacher keeping only ``layers`` (embeddings, final norm, head kept)."""
    from pocketlm.api import Model, build_network
    from pocketlm.model.card import Card

    net = teacher_model.network
    cfg = ModelConfig.from_dict({**net.config.to_dict(), "n_layers": len(layers)})
    state = {}
    for name, t in net.state_dict().items():
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m is None:
            state[name] = t.float().clone()
        elif int(m.group(1)) in layers:
            state[f"layers.{layers.index(int(m.group(1)))}.{m.group(2)}"] = t.float().clone()
    student = build_network(cfg, state, torch.float32, source="from-teacher")
    card = Card(
        name=f"{teacher_model.card.name}-{len(layers)}L",
        source=teacher_model.card.source,
        license=teacher_model.card.license,
        steps=list(teacher_model.card.steps),
    )
    card.add_step("init_from_teacher", layers=layers, teacher=teacher_model.card.name)
    return Model(student, teacher_model.tokenizer, card)


def parse_config_spec(spec: str, teacher_config: ModelConfig) -> ModelConfig:
    """A preset name (nano, micro, mini) or 'layers=6,dim=384,heads=6[,kv_heads=2,hidden=1024]'."""
    if spec in PRESETS:
        layers, dim, heads, kv, hidden = PRESETS[spec]
        values = {"layers": layers, "dim": dim, "heads": heads, "kv_heads": kv, "hidden": hidden}
    else:
        try:
            values = {k.strip(): int(v) for k, v in (p.split("=") for p in spec.split(","))}
        except ValueError:
            raise InvalidArgument(
                f"bad student spec {spec!r}; give a model path, from-teacher:N, a preset "
                f"({', '.join(PRESETS)}) or layers=6,dim=384,heads=6[,kv_heads=2,hidden=1024]"
            ) from None
        unknown = set(values) - {"layers", "dim", "heads", "kv_heads", "hidden"}
        if unknown or not {"layers", "dim", "heads"} <= set(values):
            raise InvalidArgument(
                f"student config {spec!r} needs layers, dim and heads (and may set kv_heads, "
                f"hidden){'; unknown: ' + ', '.join(sorted(unknown)) if unknown else ''}"
            )
    if values["dim"] % values["heads"]:
        raise InvalidArgument(f"dim {values['dim']} is not a multiple of heads {values['heads']}")
    return ModelConfig(
        vocab_size=teacher_config.vocab_size,
        dim=values["dim"],
        n_layers=values["layers"],
        n_heads=values["heads"],
        n_kv_heads=values.get("kv_heads", values["heads"]),
        hidden_dim=values.get("hidden", 8 * values["dim"] // 3 // 64 * 64 or 64),
        norm_eps=teacher_config.norm_eps,
        rope_theta=teacher_config.rope_theta,
        max_seq_len=teacher_config.max_seq_len,
        tie_embeddings=True,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
    )


def random_student(teacher_model, config: ModelConfig, seed: int = 0):
    """A freshly initialised student (normal(0, 0.02) matrices) sharing the teacher's tokenizer."""
    from pocketlm.api import Model
    from pocketlm.model.card import Card
    from pocketlm.model.transformer import Transformer

    torch.manual_seed(seed)
    net = Transformer(config)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    card = Card(name=f"student-{config.n_layers}L-{config.dim}", source="random init")
    card.add_step("init_random", config=config.to_dict(), seed=seed)
    return Model(net.eval(), teacher_model.tokenizer, card)


def make_student(spec: str, teacher_model, seed: int = 0, calibration: str | Path | None = None):
    """A student from SPEC: a model path/name, from-teacher:LAYERS, a preset or a config.

    ``from-teacher:LAYERS,heads=R,mlp=R`` also narrows the kept layers with structured
    pruning (Minitron-style width pruning after depth pruning): the fraction R of every
    layer's query heads / MLP channels with the least activation energy on ``calibration``
    text (default: WikiText-2 validation) is removed. Raises TokenizerMismatch when a loaded
    student tokenizes differently from the teacher, InvalidArgument for a bad spec.
    """
    if spec.startswith("from-teacher"):
        narrowing = parse_narrowing(spec)
        student = student_from_teacher(
            teacher_model, parse_layers(spec, teacher_model.config.n_layers)
        )
        if narrowing:
            from pocketlm.compress.structured import prune_structured

            seq_len = min(512, student.config.max_seq_len)
            for unit, ratio in narrowing.items():
                student = prune_structured(
                    student, unit, ratio, calibration=calibration, seq_len=seq_len, progress=False
                )
        return student
    if spec in PRESETS or "=" in spec:
        return random_student(teacher_model, parse_config_spec(spec, teacher_model.config), seed)
    from pocketlm.api import load

    student = load(spec, dtype=torch.float32)  # trained: fp32 weights
    check_tokenizers(teacher_model, student)
    return student


def check_tokenizers(teacher_model, student_model) -> None:
    """Raise TokenizerMismatch unless both models map the same strings to the same ids."""
    t, s = teacher_model.tokenizer, student_model.tokenizer
    if tokenizer_digest(t) == tokenizer_digest(s) and (
        teacher_model.config.vocab_size == student_model.config.vocab_size
    ):
        return
    tv = t.backend.get_vocab(with_added_tokens=True)
    sv = s.backend.get_vocab(with_added_tokens=True)
    diff = next((tok for tok in sorted(tv, key=tv.get) if sv.get(tok) != tv[tok]), None)
    example = (
        f"; e.g. {diff!r} is id {tv[diff]} for the teacher and "
        f"{sv.get(diff, 'absent')} for the student"
        if diff is not None
        else ""
    )
    raise TokenizerMismatch(
        f"the teacher ({len(tv)} tokens, vocab_size {teacher_model.config.vocab_size}) and the "
        f"student ({len(sv)} tokens, vocab_size {student_model.config.vocab_size}) use different "
        f"tokenizers{example}. Distillation compares their next-token distributions id by id, "
        "so they must share one: use --student from-teacher:N or a size preset/config, which "
        "reuse the teacher's tokenizer"
    )
