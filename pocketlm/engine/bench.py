"""Speed and memory of one model on this machine: prefill, decode, time to first token.

``bench`` returns plain numbers (named with their units) so the CLI, bench scripts and the
evaluator's report all read the same figures.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from pocketlm.engine.generate import decode_step, prefill
from pocketlm.model.transformer import KVCache


def peak_rss_bytes() -> int:
    """This process's own resident high-water mark.

    ``VmHWM`` belongs to the address space, which ``exec`` replaces, so a spawned child starts
    from zero; ``ru_maxrss`` survives ``exec`` and carries the forking parent's peak over (a
    CLI run from a test process that held a real model reported 6 GB for a tiny one), so it is
    only the fallback where there is no /proc (macOS: bytes there, KiB on Linux).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def weight_bytes(network: torch.nn.Module) -> int:
    """Bytes of the weights (state dict: parameters and persistent buffers such as packed
    quantized weights), counting tied tensors once; RoPE tables are not weights."""
    seen, total = set(), 0
    for t in network.state_dict().values():
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 20000), (n,), generator=g).tolist()


@torch.inference_mode()
def time_prefill(network, n_tokens: int, batch_size: int = 1, repeats: int = 3) -> float:
    """Median seconds to prefill ``batch_size`` prompts of ``n_tokens`` into a fresh cache."""
    times = []
    for r in range(repeats):
        cache = KVCache.allocate(network.config, batch_size, n_tokens + 1, network.lm_head.weight.dtype)
        prompts = [_prompt(network.config.vocab_size, n_tokens, seed=r * 100 + b) for b in range(batch_size)]
        t0 = time.perf_counter()
        for b, p in enumerate(prompts):
            prefill(network, cache, b, p)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def time_decode(network, new_tokens: int = 128, batch_size: int = 1, context: int = 16) -> float:
    """Seconds per decode step for ``batch_size`` sequences, after a ``context``-token prompt."""
    cfg = network.config
    cache = KVCache.allocate(cfg, batch_size, context + new_tokens + 1, network.lm_head.weight.dtype)
    for b in range(batch_size):
        prefill(network, cache, b, _prompt(cfg.vocab_size, context, seed=b))
    tokens = torch.full((batch_size,), 100)
    decode_step(network, cache, tokens, torch.full((batch_size,), context))  # warm-up
    t0 = time.perf_counter()
    for i in range(new_tokens):
        logits = decode_step(network, cache, tokens, torch.full((batch_size,), context + 1 + i))
        tokens = logits.argmax(-1)
    return (time.perf_counter() - t0) / new_tokens


def bench(
    network,
    prompt_lengths: tuple[int, ...] = (128, 512),
    new_tokens: int = 128,
    batch_sizes: tuple[int, ...] = (1,),
    contexts: tuple[int, ...] = (16,),
) -> dict:
    """All figures for one model; keys carry their units.

    ``prefill_tokens_per_s`` is for the longest prompt (512 by default) and
    ``decode_tokens_per_s`` for batch 1 after the first context; sweeps over batch size and
    context are reported under ``decode_sweep``.
    """
    from pocketlm.engine import fused

    out: dict = {"threads": torch.get_num_threads(), "weight_bytes": weight_bytes(network),
                 # "fused": one C++ call a step (engine/fused.py); "pytorch": op by op
                 "decode_path": "fused" if fused.plan_for(network) is not None else "pytorch"}
    for n in prompt_lengths:
        s = time_prefill(network, n)
        out[f"prefill_{n}_tokens_per_s"] = n / s
        out[f"prefill_{n}_s"] = s
    longest = max(prompt_lengths)
    out["prefill_tokens_per_s"] = out[f"prefill_{longest}_tokens_per_s"]
    sweep = []
    for ctx in contexts:
        for b in batch_sizes:
            step = time_decode(network, new_tokens, b, ctx)
            sweep.append({"batch_size": b, "context": ctx, "step_s": step,
                          "tokens_per_s": b / step, "per_sequence_tokens_per_s": 1 / step})
    first = sweep[0]
    out["decode_tokens_per_s"] = first["tokens_per_s"] / first["batch_size"]
    out["decode_sweep"] = sweep
    # Time to first token: prefill of the shortest prompt plus one decode step.
    short = min(prompt_lengths)
    out["time_to_first_token_s"] = out[f"prefill_{short}_s"] + first["step_s"]
    out["time_to_first_token_prompt_tokens"] = short
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out
