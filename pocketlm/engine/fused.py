"""The fused decode step: every layer of a one-token-per-sequence step in one C++ call.

A decode step of a small model is ~200 matrix-vector products and ~30 small ops per layer.
Dispatched one by one from Python, the overhead (~7,600 dispatcher calls and an OpenMP wake-up
per product) costs as much as streaming the weights. ``DecodePlan`` in
``kernels/decode.cpp`` runs the same maths as ``model/transformer.py`` with the threads kept
up for the whole step, reading fp32 or packed int8/int4/int3 weights in place.

``decode(model, cache, tokens, positions)`` returns the logits, or None when this model or
call is not one the plan covers, and the caller takes the plain PyTorch path:
- the kernel could not be built, or ``POCKETLM_FUSED=0``;
- gradients are wanted, or a layer is not a plain fp32 Linear or a packed int8/int4/int3
  QLinear (e.g. LoRA adapters), or a forward hook is registered on any of its modules (a
  hook must see the activations, which the C++ step never hands back);
- more than 8 sequences, a non-fp32 cache, or a position beyond the cache.
The plan reads the weight tensors it was built from (in-place updates, e.g. an optimizer step,
are seen); when a module or weight is replaced (LoRA merge, a module swap) it is rebuilt.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from pocketlm.compress.qlinear import QuantizedTensor, TiedQLinear, int8_activations
from pocketlm.engine.fastlinear import GemvLinear, _kernel
from pocketlm.model.transformer import KVCache, Transformer

log = logging.getLogger(__name__)
MAX_ROWS = 8
# Plans live beside their models, not on them: a model stays deep-copyable and picklable
# (quantize and distill copy networks), and its plan goes when it does.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("POCKETLM_FUSED", "1") != "0"


def _weight_spec(module: nn.Module):
    """(tensors, [bits, K, group size]) for one linear layer, or None if the plan cannot read it."""
    if isinstance(module, TiedQLinear):
        module = module.embedding
    if isinstance(module, QuantizedTensor):  # QLinear, or the QEmbedding a tied head reads
        if module.compute_dtype != torch.float32 or module.bits not in (3, 4, 8):
            return None
        codes = module.kernel_codes()  # 3-bit: unpacked, one code a byte
        meta = [module.bits, module.kp, module.group_size, int(int8_activations())]
        return [codes, module.scales, module.zeros], meta
    if type(module) in (nn.Linear, GemvLinear):
        w = module.weight
        if module.bias is not None or w.dtype != torch.float32 or not w.is_contiguous():
            return None
        return [w], [32, w.shape[1], 0]
    return None


def _linears(model: Transformer) -> list[nn.Module]:
    out = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    return out + [model.lm_head]


def _norms(model: Transformer) -> list[torch.Tensor]:
    out = []
    for layer in model.layers:
        out += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    return out + [model.norm.weight]


class _Plan:
    def __init__(self, model: Transformer, ext):
        specs = [_weight_spec(m) for m in _linears(model)]  # before the fingerprint: 3-bit
        # codes are unpacked (and cached on the module) by kernel_codes()
        norms = _norms(model)
        self.ok = all(s is not None for s in specs) and all(
            n.dtype == torch.float32 and n.is_contiguous() for n in norms)
        self.plan = None
        if self.ok:
            try:
                self.plan = ext.DecodePlan(
                    [n.detach() for n in norms], [[t.detach() for t in s[0]] for s in specs],
                    [s[1] for s in specs], model.rope_cos, model.rope_sin,
                    float(model.config.norm_eps))
            except RuntimeError as e:  # shapes the plan does not cover: the PyTorch path
                log.info("fused decode unavailable for this model: %s", str(e).splitlines()[0])
                self.ok = False
        self.fingerprint = _fingerprint(model)
        self.int8_act = int8_activations()  # read by _weight_spec: a change rebuilds the plan
        self.hooks = [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]

    def current(self, model: Transformer) -> bool:
        """Whether every module, parameter and buffer is still the object the plan was built on
        (~600 identity checks, ~40 us; a swapped module or a replaced weight fails it)."""
        return all(d.get(k) is o for d, k, o in self.fingerprint)

    def hooked(self) -> bool:
        """Whether any module has a forward hook now (hooks are added to these same dicts)."""
        return any(self.hooks) or bool(_global_forward_hooks or _global_forward_pre_hooks)


def _fingerprint(model: nn.Module) -> list[tuple[dict, str, object]]:
    out = []
    for module in model.modules():
        for table in (module._modules, module._parameters, module._buffers):
            out += [(table, k, v) for k, v in table.items()]
        if "_unpacked" in module.__dict__:  # 3-bit codes unpacked for the kernel, cached
            out.append((module.__dict__, "_unpacked", module.__dict__["_unpacked"]))
    return out


def plan_for(model: Transformer) -> _Plan | None:
    """The model's decode plan (built on first use, rebuilt when its weights change)."""
    if not enabled() or not isinstance(model, Transformer):
        return None
    if not model.config.is_plain_llama:  # biases, QK-norm, Gemma's norms, GELU, windows...:
        return None  # the C++ step computes LLaMA's block only
    ext = _kernel()
    if ext is None or not hasattr(ext, "DecodePlan"):
        return None
    plan = _PLANS.get(model)
    if plan is None or not plan.current(model) or plan.int8_act != int8_activations():
        plan = _Plan(model, ext)
        _PLANS[model] = plan
    return plan if plan.ok else None


def decode(
    model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    """Logits (B, V) for one new token in each of the first B cache rows, or None (see above)."""
    B = tokens.shape[0]
    if B > MAX_ROWS or cache.k[0].dtype != torch.float32 or int(positions.max()) >= cache.max_seq_len:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return None
    plan = plan_for(model)
    if plan is None or plan.hooked():
        return None
    x = model.embed_tokens(tokens.reshape(B))
    if x.dtype != torch.float32:
        return None
    return plan.plan.step(x.contiguous(), positions.reshape(B).to(torch.long), cache.k, cache.v, 0)
