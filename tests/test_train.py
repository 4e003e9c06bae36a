"""Fine-tuning and distillation on tiny models: data, masks, losses, LoRA, cache, trainer."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from tiny import make_tiny_model, make_tokenizer

import pocketlm
from pocketlm.cli import main
from pocketlm.train import checkpoint as ckpt
from pocketlm.train.data import (
    Blocks,
    DataError,
    Encoded,
    encode_chat,
    encode_record,
    load_data,
    pack,
    read_records,
    split,
)
from pocketlm.train.distill import (
    DistillObjective,
    TokenizerMismatch,
    build_cache,
    check_tokenizers,
    divergence,
    kd_loss,
    load_cache,
    make_student,
    parse_layers,
    parse_narrowing,
)
from pocketlm.train.lora import LoRALinear, apply_lora, merge_lora, save_adapter
from pocketlm.train.trainer import (
    OutOfMemory,
    TrainingDiverged,
    TrainingInterrupted,
    TrainSettings,
    check_memory,
    cross_entropy,
    estimate_memory,
    evaluate,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models train faster on 1


def runs(ids, target):
    """The contiguous runs of target tokens, as lists of ids."""
    out, cur = [], []
    for i, t in zip(ids, target):
        if t:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# -- data -----------------------------------------------------------------------------------
def test_chat_loss_covers_exactly_the_assistant_turns():
    tok = make_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and the rest?"},
        {"role": "assistant", "content": "fine, thanks"},
    ]
    e = encode_chat(messages, tok)
    assert tok.decode(e.ids) == tok.apply_chat_template(messages, add_generation_prompt=False)
    assert [tok.decode(r) for r in runs(e.ids, e.target)] == [
        "yo<|im_end|>\n",
        "fine, thanks<|im_end|>\n",
    ]
    # everything else, prompts and the assistant headers included, is context only
    context = tok.decode([i for i, t in zip(e.ids, e.target) if not t])
    assert context == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\nand the rest?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_instruction_record_without_template_masks_the_prompt():
    tok = make_tokenizer()
    tok.chat_template = None
    e = encode_record({"prompt": "2+2?", "response": "4"}, tok)
    assert tok.decode(e.ids) == "2+2?\n4<|im_end|>"
    assert [tok.decode(r) for r in runs(e.ids, e.target)] == ["4<|im_end|>"]


def test_packing_predicts_every_token_but_the_first_exactly_once():
    examples = [
        Encoded([1, 2, 3], [True, True, True]),
        Encoded([4, 5, 6, 7, 8], [False] * 2 + [True] * 3),
    ]
    b = pack(examples, seq_len=3)
    assert b.tokens.tolist() == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 0, 0]]
    assert b.mask[:, 1:].tolist() == [
        [True, True, False],
        [False, True, True],
        [True, False, False],
    ]
    assert b.n_targets == 5  # tokens 2, 3, 6, 7, 8


def test_bitext_csv_columns_are_found(shared_data):
    fmt, records = read_records(
        shared_data / "bitext-customer-support" / "bitext_customer_support_4514.csv"
    )
    assert fmt == "instruction" and len(records) == 4514
    assert records[0]["prompt"] == "how can I cancel purchase 113542617735902?"
    assert records[0]["response"].startswith("I understand how unnerving")
    assert "\r" not in records[0]["response"]


def test_held_out_split_is_seeded():
    items = list(range(100))
    train_a, held_a = split(items, 0.1, seed=0)
    _, held_b = split(items, 0.1, seed=0)
    assert held_a == held_b and len(held_a) == 10 and sorted(train_a + held_a) == items
    assert split(items, 0.1, seed=1)[1] != held_a


def test_load_data_text_chat_and_jsonl(tmp_path):
    tok = make_tokenizer()
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(30)
    ]
    d = load_data(write_jsonl(tmp_path / "c.jsonl", chats), tok, seq_len=16)
    assert d.info["format"] == "chat" and d.info["held_out_records"] == 3
    assert d.train.seq_len == 16 and d.held_out is not None
    # each chat has "aN<|im_end|>\n" as targets: 'a', digit(s), im_end, newline
    assert d.info["train_target_tokens"] + d.info["held_out_target_tokens"] == sum(
        4 + (i >= 10) for i in range(30)
    )
    text = tmp_path / "t.txt"
    text.write_text("one long document without blank lines " * 40)
    d = load_data(text, tok, seq_len=32)
    assert d.info["format"] == "text" and d.held_out is not None


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"e\.jsonl is empty"):
        read_records(tmp_path / "e.jsonl")


def test_wrong_csv_columns_are_named(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("question_text,label\nhello,1\n")
    with pytest.raises(DataError) as e:
        read_records(p, format="instruction")
    msg = str(e.value)
    assert "d.csv" in msg and "prompt column" in msg and "response column" in msg
    assert "'question_text', 'label'" in msg
    with pytest.raises(DataError, match=r"missing response column 'reply'"):
        read_records(p, prompt_column="question_text", response_column="reply")


def test_malformed_rows_are_counted(tmp_path):
    rows = [json.dumps({"prompt": "a", "response": "b"})] * 5
    rows[1] = "{not json"
    rows[3] = json.dumps({"prompt": "a", "response": ""})
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(rows))
    with pytest.raises(DataError) as e:
        read_records(p)
    assert "bad.jsonl: 2 of 5 lines are malformed; the first is line 2: not valid JSON" in str(
        e.value
    )
    c = tmp_path / "bad.csv"
    c.write_text('prompt,response\nhi,there\n"x","y","z"\nok,\n')
    with pytest.raises(DataError, match=r"bad\.csv: 2 of 3 rows are malformed; the first is row 2"):
        read_records(c)


# -- distillation losses --------------------------------------------------------------------
def test_divergences_on_hand_made_distributions():
    p = torch.tensor([0.5, 0.5]).log()
    q = torch.tensor([0.25, 0.75]).log()
    fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = [0.375, 0.625]
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    assert divergence(q, p, "forward").item() == pytest.approx(fwd, abs=1e-7)
    assert divergence(q, p, "reverse").item() == pytest.approx(rev, abs=1e-7)
    assert divergence(q, p, "symmetric").item() == pytest.approx((fwd + rev) / 2, abs=1e-7)
    assert divergence(q, p, "jsd").item() == pytest.approx(jsd, abs=1e-7)
    for kind in ("forward", "reverse", "symmetric", "jsd"):
        assert divergence(p, p, kind).item() == 0.0


def test_kd_loss_temperature_and_top_k_support():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert kd_loss(t, t, "forward").abs().max().item() < 1e-6
    T = 2.0
    want = T**2 * divergence(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1))
    torch.testing.assert_close(kd_loss(s, t, "forward", T), want)
    # a top-k teacher covering the whole vocabulary, in another order, gives the same loss
    perm = torch.randperm(5)
    cached = (torch.log_softmax(t, -1)[..., perm], perm.expand(2, 3, 5))
    torch.testing.assert_close(kd_loss(s, cached, "reverse", T), kd_loss(s, t, "reverse", T))


def test_top_k_forward_kl_also_pulls_student_mass_into_the_top_k():
    torch.manual_seed(1)
    z = torch.randn(1, 2, 6)
    logp = torch.log_softmax(z, -1)
    top = logp.topk(3, -1)
    teacher = (top.values, top.indices)
    # identical models: -log(mass the student puts on the teacher's top-3); 0 for other kinds
    mass = top.values.exp().sum(-1)
    torch.testing.assert_close(kd_loss(z, teacher, "forward"), -mass.log())
    assert kd_loss(z, teacher, "reverse").abs().max().item() < 1e-6


def test_teacher_cache_round_trip(tmp_path):
    teacher = make_tiny_model(seed=1)
    blocks = Blocks(torch.randint(0, 264, (3, 9)), torch.ones(3, 9, dtype=torch.bool))
    path = build_cache(
        teacher.network,
        blocks,
        k=4,
        path=tmp_path / "c.safetensors",
        batch_size=2,
        meta={"teacher": "tiny"},
        progress=False,
    )
    cache = load_cache(path, blocks, {"teacher": "tiny"})
    logp, ids = cache.logprobs, cache.ids
    assert torch.equal(cache.rows, torch.arange(3))
    assert logp.dtype == torch.float16 and ids.dtype == torch.int32 and ids.shape == (3, 8, 4)
    full = torch.log_softmax(teacher.network(blocks.tokens[:, :-1]), -1)
    top = full.topk(4, -1)
    assert torch.equal(ids.long(), top.indices)
    torch.testing.assert_close(logp.float(), top.values, atol=2e-3, rtol=1e-3)
    assert path.stat().st_size < 3 * 8 * 4 * 6 + 3 * 8 + 1024  # fp16 + int32 per entry, rows
    other = Blocks(blocks.tokens.flip(0), blocks.mask)
    assert load_cache(path, other, {"teacher": "tiny"}) is None  # other data: rebuild
    assert load_cache(path, blocks, {"teacher": "other"}) is None


def test_student_from_teacher_keeps_chosen_layers():
    teacher = make_tiny_model(n_layers=4)
    assert parse_layers("from-teacher:2", 4) == [0, 3]
    assert parse_layers("from-teacher:10", 30) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    student = make_student("from-teacher:1,2", teacher)
    assert student.config.n_layers == 2
    t, s = teacher.network.state_dict(), student.network.state_dict()
    assert torch.equal(s["layers.0.mlp.up_proj.weight"], t["layers.1.mlp.up_proj.weight"])
    assert torch.equal(s["layers.1.self_attn.q_proj.weight"], t["layers.2.self_attn.q_proj.weight"])
    assert torch.equal(s["embed_tokens.weight"], t["embed_tokens.weight"])
    with pytest.raises(pocketlm.PocketError, match=r"layers \[7\] do not exist"):
        make_student("from-teacher:0,7", teacher)


def test_from_teacher_student_narrowed_by_structured_pruning(tmp_path):
    teacher = make_tiny_model(n_layers=4, n_heads=8, n_kv_heads=2)
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"the cat number {i} sat on the mat." for i in range(400)))
    spec = "from-teacher:2,heads=0.25,mlp=0.5"
    assert parse_narrowing(spec) == {"heads": 0.25, "mlp": 0.5}
    assert parse_layers(spec, 4) == [0, 3]
    student = make_student(spec, teacher, calibration=calib)
    cfg = student.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (2, 6, 2, 64)
    assert [s["step"] for s in student.card.steps][-3:] == [
        "init_from_teacher",
        "prune_structured",
        "prune_structured",
    ]
    # every kept MLP channel is one of the teacher's layer-3 channels, unchanged
    t_up = teacher.network.state_dict()["layers.3.mlp.up_proj.weight"]
    s_up = student.network.state_dict()["layers.1.mlp.up_proj.weight"]
    assert s_up.shape == (64, 64)
    assert all(bool((t_up == row).all(1).any()) for row in s_up)
    logits = student.network(torch.tensor([[5, 6, 7]]))
    assert logits.shape == (1, 3, cfg.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(pocketlm.PocketError, match="heads=R or mlp=R"):
        make_student("from-teacher:2,mlp=1.5", teacher)
    with pytest.raises(pocketlm.PocketError, match="heads=R or mlp=R"):
        make_student("from-teacher:2,width=0.5", teacher)


def test_tokenizer_mismatch_is_refused():
    teacher = make_tiny_model()
    student = make_tiny_model()
    from tokenizers import AddedToken

    student.tokenizer.backend.add_tokens([AddedToken("<|tool|>", special=True)])
    with pytest.raises(TokenizerMismatch, match="use different tokenizers"):
        check_tokenizers(teacher, student)


# -- LoRA ---------------------------------------------------------------------------------
def test_lora_starts_as_the_base_and_merges_exactly(tmp_path):
    model = make_tiny_model()
    x = torch.randint(0, 264, (2, 12))
    base = model.network(x).detach()
    names = apply_lora(model.network, rank=4, targets=["q_proj", "v_proj"])
    assert names == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]
    assert torch.equal(model.network(x), base)  # B = 0: exactly the base model
    trainable = [n for n, p in model.network.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for m in model.network.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
    unmerged = model.network(x).detach()
    assert not torch.allclose(unmerged, base, atol=1e-3)
    model.save(tmp_path / "base")  # LoRA layers are not in a plain save: keep the base apart
    base_model = make_tiny_model()
    base_model.save(tmp_path / "base")
    save_adapter(model.network, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    merge_lora(model.network)
    torch.testing.assert_close(model.network(x), unmerged, atol=1e-5, rtol=1e-5)
    loaded = pocketlm.load(tmp_path / "adapter")  # base + adapter, merged at load
    torch.testing.assert_close(loaded.network(x), unmerged, atol=1e-5, rtol=1e-5)


# -- the trainer --------------------------------------------------------------------------
def tiny_data(n_rows=24, seq_len=16, seed=0) -> Blocks:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 40, (n_rows, seq_len + 1), generator=g)
    return Blocks(tokens, torch.ones_like(tokens, dtype=torch.bool))


def quick(**kw) -> TrainSettings:
    base = {
        "steps": 6,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 1,
        "eval_every": 3,
        "eval_rows": 4,
        "checkpoint_every": 2,
        "progress": False,
    }
    return TrainSettings(**{**base, **kw})


def test_training_lowers_the_loss_and_writes_its_outputs(tmp_path):
    model = make_tiny_model()
    data = tiny_data()
    result = train(model.network, data, data.head(8), quick(steps=12), tmp_path)
    assert result.evals[-1]["loss"] < result.evals[0]["loss"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 12 and log["tokens"] == 12 * 4 * 16 == log["target_tokens"]
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # removed after a finished run


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def objective(network, inputs, targets, rows):
        calls["n"] += 1
        loss, parts = cross_entropy(network, inputs, targets, rows)
        return (loss * float("nan") if calls["n"] == 5 else loss), parts

    model = make_tiny_model()
    with pytest.raises(TrainingDiverged) as e:
        train(model.network, tiny_data(), None, quick(), tmp_path, objective)
    assert "stopped at step 5: the loss is nan" in str(e.value)
    assert "last good checkpoint (step 4)" in str(e.value)
    assert ckpt.load(tmp_path / "checkpoints")["step"] == 4


def test_ctrl_c_checkpoints_and_resume_equals_an_uninterrupted_run(tmp_path):
    data = tiny_data()
    ref = make_tiny_model()
    train(ref.network, data, data.head(4), quick(), tmp_path / "ref")
    calls = {"n": 0}

    def interrupt_at_3(network, inputs, targets, rows):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return cross_entropy(network, inputs, targets, rows)

    model = make_tiny_model()
    with pytest.raises(TrainingInterrupted, match="stopped at step 3 of 6"):
        train(model.network, data, data.head(4), quick(), tmp_path / "b", interrupt_at_3)
    assert ckpt.load(tmp_path / "b" / "checkpoints")["step"] == 3
    fresh = make_tiny_model()
    result = train(fresh.network, data, data.head(4), quick(resume=True), tmp_path / "b")
    assert [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    for (name, a), b in zip(ref.network.state_dict().items(), fresh.network.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_with_other_settings_is_refused(tmp_path):
    data = tiny_data()
    model = make_tiny_model()
    train(model.network, data, None, quick(keep_checkpoint=True, steps=3), tmp_path)
    assert ckpt.load(tmp_path / "checkpoints")["step"] == 2
    with pytest.raises(ckpt.CheckpointMismatch, match="lr: checkpoint 0.01, now 0.02"):
        train(model.network, data, None, quick(steps=3, lr=0.02, resume=True), tmp_path)


def test_memory_estimate_refuses_what_does_not_fit():
    model = make_tiny_model()
    est = estimate_memory(model.network, micro_rows=8, seq_len=256)
    assert est["trainable_params"] == sum(p.numel() for p in model.network.parameters())
    assert est["optimizer_bytes"] == 12 * est["trainable_params"]
    check_memory(est, available=10 * est["total_bytes"])
    with pytest.raises(
        OutOfMemory, match=r"needs about .* MiB .* lower --batch-size .*\(--lora 16\)"
    ):
        check_memory(est, available=est["total_bytes"] // 2)
    # FSDP over 4 processes: each holds a quarter of the weights, grads and two moments
    sharded = estimate_memory(model.network, micro_rows=2, seq_len=256, shards=4)
    assert sharded["optimizer_bytes"] == 16 * est["trainable_params"] // 4


def test_distill_objective_with_identical_teacher_is_cross_entropy_weighted():
    model = make_tiny_model()
    data = tiny_data(n_rows=4)
    x, y = data.tokens[:, :-1], data.tokens[:, 1:]
    obj = DistillObjective("forward", kd_weight=0.25, teacher=model.network)
    loss, parts = obj(model.network, x, y, torch.arange(4))
    assert parts["kd"].abs().max().item() < 1e-5
    torch.testing.assert_close(loss, 0.25 * parts["kd"] + 0.75 * parts["ce"])


# -- the commands ---------------------------------------------------------------------------
def test_finetune_and_distill_commands(tmp_path, capsys):
    make_tiny_model().save(tmp_path / "tiny")
    make_tiny_model(seed=3, n_layers=4).save(tmp_path / "teacher")
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"{2 * i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = [
        "--data",
        str(data),
        "--seq-len",
        "32",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--eval-rows",
        "2",
    ]
    assert (
        main(
            ["finetune", str(tmp_path / "tiny"), *common, "--lora", "4", "-o", str(tmp_path / "ad")]
        )
        == 0
    )
    assert "held-out perplexity" in capsys.readouterr().out
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    tuned = pocketlm.load(tmp_path / "ad")
    assert tuned.card.steps[-1]["step"] == "finetune"
    assert tuned.card.metrics["finetune"]["steps"] == 3

    args = [
        "distill",
        "--teacher",
        str(tmp_path / "teacher"),
        "--student",
        "from-teacher:2",
        *common,
        "--top-k",
        "8",
        "-o",
        str(tmp_path / "st"),
    ]
    assert main(args) == 0
    cache = tmp_path / "st" / "teacher_top8.safetensors"
    stamp = cache.stat().st_mtime_ns
    student = pocketlm.load(tmp_path / "st")
    assert student.config.n_layers == 2
    assert [s["step"] for s in student.card.steps][-2:] == ["init_from_teacher", "distill"]
    assert main(args) == 0
    assert cache.stat().st_mtime_ns == stamp  # the second run read the cache, no teacher pass

    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert (
        main(
            [
                "finetune",
                str(tmp_path / "tiny"),
                "--data",
                str(tmp_path / "bad.csv"),
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "columns found: 'a', 'b'" in capsys.readouterr().err


def test_bf16_autocast_where_the_cpu_has_it(tmp_path):
    from pocketlm.train.trainer import bf16_supported

    model = make_tiny_model()
    data = tiny_data()
    if not bf16_supported():
        with pytest.raises(pocketlm.PocketError, match="--bf16 needs a CPU with"):
            train(model.network, data, None, quick(bf16=True), tmp_path)
        return
    result = train(model.network, data, data.head(4), quick(bf16=True), tmp_path)
    assert result.evals[-1]["loss"] < result.evals[0]["loss"]
    assert all(p.dtype == torch.float32 for p in model.network.parameters())  # weights stay fp32


def test_evaluation_on_a_few_rows_spreads_them_over_the_whole_held_out_set(tiny_model):
    """A file sorted by topic must not be judged on its first topic only."""
    blocks = tiny_data(n_rows=20)
    spread = Blocks(blocks.tokens[[0, 6, 13, 19]], blocks.mask[[0, 6, 13, 19]])
    some = evaluate(tiny_model.network, blocks, batch_size=3, rows=4)
    assert some["loss"] == pytest.approx(evaluate(tiny_model.network, spread)["loss"], abs=1e-6)
    assert evaluate(tiny_model.network, blocks, rows=0) == evaluate(tiny_model.network, blocks)
