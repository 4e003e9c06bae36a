"""The teacher's top-k cache covers only the rows a distillation run reads.

A short run on a big file must not pay for the teacher on rows it never trains on; a cache
built for a small budget grows for a larger one instead of being reused as if complete; an
interrupted build keeps the rows it finished.
"""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_model

from pocketlm.train.data import Blocks, Data
from pocketlm.train.distill import (
    _read_cache,
    build_cache,
    load_cache,
    make_student,
    rows_used,
    tokenizer_digest,
)
from pocketlm.train.steps import distill
from pocketlm.train.trainer import TrainSettings, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train faster on 1


def blocks(n_rows=64, seq_len=8) -> Blocks:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 40, (n_rows, seq_len + 1), generator=g)
    return Blocks(tokens, torch.ones_like(tokens, dtype=torch.bool))


def settings(**kw) -> TrainSettings:
    base = {
        "steps": 3,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 1,
        "eval_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "memory_check": False,
    }
    return TrainSettings(**{**base, **kw})


def count_rows(network) -> list[int]:
    """Rows the teacher runs on, appended per forward pass."""
    seen = []
    network.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


def test_rows_used_are_the_rows_the_trainer_reads(tmp_path):
    data = blocks()
    read = []

    def recording(network, inputs, targets, rows):
        read.extend(rows.tolist())
        logits = network(inputs)
        return logits.float().logsumexp(-1) * 0, {}

    s = settings(grad_accum=2)
    train(make_tiny_model().network, data, None, s, tmp_path, recording)
    assert torch.equal(rows_used(s, data), torch.tensor(sorted(set(read))))
    assert len(rows_used(s, data)) == 3 * 4 * 2 < len(data)
    # a budget of at least one epoch reads every row
    assert torch.equal(rows_used(settings(steps=None, epochs=1.0), data), torch.arange(64))
    assert torch.equal(rows_used(settings(steps=None, tokens=64 * 8), data), torch.arange(64))


def test_short_distillation_on_a_big_file_caches_only_its_rows(tmp_path):
    teacher = make_tiny_model(seed=3, n_layers=4)
    data = Data(train=blocks(), held_out=None, info={})
    seen = count_rows(teacher.network)
    cache_path = tmp_path / "c.safetensors"
    short = settings()  # 3 steps x 4 rows of 64
    student = distill(
        teacher,
        make_student("from-teacher:2", teacher),
        data,
        tmp_path / "a",
        short,
        top_k=4,
        cache_path=cache_path,
        eval_before=False,
    )
    meta = {"teacher": "tiny", "tokenizer": tokenizer_digest(teacher.tokenizer), "k": 4}
    cache = load_cache(cache_path, data.train, meta, rows_used(short, data.train))
    assert sum(seen) == 12 and torch.equal(cache.rows, rows_used(short, data.train))
    assert load_cache(cache_path, data.train, meta) is None  # not a cache of every row

    # the same run with a cache of every row trains the same student
    full_path = tmp_path / "full.safetensors"
    build_cache(teacher.network, data.train, 4, full_path, 8, meta, progress=False)
    seen.clear()
    reference = distill(
        teacher,
        make_student("from-teacher:2", teacher),
        data,
        tmp_path / "b",
        short,
        top_k=4,
        cache_path=full_path,
        eval_before=False,
    )
    assert seen == []  # a larger cache serves a smaller budget as it is
    for (name, a), b in zip(
        student.network.state_dict().items(), reference.network.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)

    # a larger budget is not served by the small cache: it is extended with the missing rows
    longer = settings(steps=6)
    need = rows_used(longer, data.train)
    assert load_cache(cache_path, data.train, meta, need) is None
    seen.clear()
    distill(
        teacher,
        make_student("from-teacher:2", teacher),
        data,
        tmp_path / "c",
        longer,
        top_k=4,
        cache_path=cache_path,
        eval_before=False,
    )
    grown = load_cache(cache_path, data.train, meta, need)
    assert sum(seen) == len(need) - 12 and torch.equal(grown.rows, need)
    old = torch.isin(need, cache.rows)
    assert torch.equal(grown.ids[old], cache.ids)  # the first rows were kept, not recomputed


def test_cache_values_are_the_teachers_top_k_for_the_chosen_rows(tmp_path):
    teacher = make_tiny_model(seed=1)
    data = blocks(n_rows=10)
    rows = torch.tensor([7, 2, 5])
    path = build_cache(
        teacher.network, data, 3, tmp_path / "c.safetensors", 2, progress=False, rows=rows
    )
    cache = load_cache(path, data, {"k": 3}, rows)
    assert torch.equal(cache.rows, torch.tensor([2, 5, 7]))
    logp, ids = cache.lookup(torch.tensor([5, 7]))
    with torch.no_grad():
        top = torch.log_softmax(teacher.network(data.tokens[[5, 7], :-1]), -1).topk(3, -1)
    assert torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(logp.float(), top.values, atol=2e-3, rtol=1e-3)
    with pytest.raises(KeyError, match=r"no rows \[3\]"):
        cache.lookup(torch.tensor([2, 3]))
    assert load_cache(path, data, {"k": 4}, rows) is None  # another k: rebuild


def test_an_interrupted_cache_build_keeps_its_finished_rows(tmp_path):
    teacher = make_tiny_model(seed=1)
    data = blocks(n_rows=10)
    path = tmp_path / "c.safetensors"
    calls = {"n": 0}
    real = teacher.network.forward

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    teacher.network.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher.network, data, 3, path, 2, progress=False)
    partial = _read_cache(path, data, {"k": 3})
    assert torch.equal(partial.rows, torch.arange(4))  # two batches of two
    assert not path.with_name(path.name + ".tmp").exists()

    teacher.network.forward = real
    seen = count_rows(teacher.network)
    build_cache(teacher.network, data, 3, path, 2, progress=False)
    assert sum(seen) == 6  # only the rows the first build had not finished
    done = load_cache(path, data, {"k": 3})
    fresh = build_cache(teacher.network, data, 3, tmp_path / "fresh.safetensors", 2, progress=False)
    ref = load_cache(fresh, data, {"k": 3})
    assert torch.equal(done.ids, ref.ids) and torch.equal(done.logprobs, ref.logprobs)
