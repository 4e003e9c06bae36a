"""The fused decode step: every layer of a one-token-per-sequence step in one C++ call.

A decode step of a small model is ~200 matrix-vector products and ~30 small ops per layer.
Dispatched one by one from Python, the overhead (~7,600 dispatcher calls and an OpenMP wake-up
per product) costs as much as streaming the weights. ``DecodePlan`` in
``kernels/decode.cpp`` runs the same maths as ``model/transformer.py`` with the threads kept
up for the whole step, for every family the decoder runs (LLaMA, Qwen2's biases, Qwen3's and
Gemma's q/k norms, Gemma's extra norms, GELU gate, local layers and soft-cap), reading fp32
weights, packed int8/int4/int3 codes or a GGUF file's GGML blocks in place.

``decode(model, cache, tokens, positions)`` returns the logits, or None when this model or
call is not one the plan covers, and the caller takes the plain PyTorch path:
- the kernel could not be built, or ``POCKETLM_FUSED=0``;
- gradients are wanted, or a layer is not a plain fp32 Linear, a packed int8/int4/int3
  QLinear or a GGML one (e.g. LoRA adapters, bf16 weights), or a forward hook is registered
  on any of its modules (a hook must see the activations, which the C++ step never hands back);
- a non-fp32 cache, or a position beyond the cache (more than 8 sequences run 8 at a time).
``verify(model, cache, row, ids, start)`` runs several new tokens of one sequence the same way
(a speculative draft's check), with the same conditions.
The plan reads the weight tensors it was built from (in-place updates, e.g. an optimizer step,
are seen); when a module or weight is replaced (LoRA merge, a module swap) it is rebuilt.
The cache is the model's own ``KVCache``, so a sequence can move between the two paths at any
step (prefill in PyTorch, decode fused).
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
from pocketlm.model.ggml import GGMLTensor, TiedGGMLHead
from pocketlm.model.transformer import KVCache, Transformer

log = logging.getLogger(__name__)
MAX_ROWS = 8
# Plans live beside their models, not on them: a model stays deep-copyable and picklable
# (quantize and distill copy networks), and its plan goes when it does.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return os.environ.get("POCKETLM_FUSED", "1") != "0"


def _weight_spec(module: nn.Module):
    """(tensors, [bits, K, group size or GGML type, ...]) for one linear layer, or None if the
    plan cannot read it. A bias, where the layer has one (Qwen2's q/k/v), is the last tensor."""
    if isinstance(module, (TiedQLinear, TiedGGMLHead)):
        module = module.embedding  # a tied head reads the embedding's codes or blocks
    if isinstance(module, GGMLTensor):  # GGMLLinear, or the GGMLEmbedding a tied head reads
        if not module.blocks.is_contiguous():
            return None
        tensors, meta = [module.blocks], [0, module.k, module.qtype]
    elif isinstance(module, QuantizedTensor):  # QLinear, or the QEmbedding a tied head reads
        if module.compute_dtype != torch.float32 or module.bits not in (3, 4, 8):
            return None
        codes = module.kernel_codes()  # 3-bit: unpacked, one code a byte
        tensors = [codes, module.scales, module.zeros]
        meta = [module.bits, module.kp, module.group_size, int(int8_activations())]
    elif type(module) in (nn.Linear, GemvLinear):
        w = module.weight
        if w.dtype != torch.float32 or not w.is_contiguous():
            return None
        tensors, meta = [w.detach()], [32, w.shape[1], 0]
    else:
        return None
    bias = getattr(module, "bias", None)
    if bias is not None:
        if bias.dtype != torch.float32 or not bias.is_contiguous():
            return None
        tensors.append(bias.detach())
    return tensors, meta


def _linears(model: Transformer) -> list[nn.Module]:
    out = []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    return out + [model.lm_head]


_NONE = torch.empty(0)  # a norm the family does not have


def _norms(model: Transformer) -> list[list[torch.Tensor]]:
    """Per layer: input, post-attention, Gemma's pre/post feed-forward, q and k norm weights
    (``_NONE`` where absent); then the final norm."""
    out = []
    for layer in model.layers:
        a = layer.self_attn
        ff = ([layer.pre_feedforward_layernorm.weight, layer.post_feedforward_layernorm.weight]
              if layer.post_norms else [_NONE, _NONE])
        qk = [a.q_norm.weight, a.k_norm.weight] if a.qk_norm else [_NONE, _NONE]
        out.append([layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *ff, *qk])
    return out + [[model.norm.weight]]


class _Plan:
    def __init__(self, model: Transformer, ext):
        specs = [_weight_spec(m) for m in _linears(model)]  # before the fingerprint: 3-bit
        # codes are unpacked (and cached on the module) by kernel_codes()
        norms = _norms(model)
        self.ok = all(s is not None for s in specs) and all(
            n.dtype == torch.float32 and n.is_contiguous() for ns in norms for n in ns)
        self.plan = None
        if self.ok:
            c = model.config
            try:
                self.plan = ext.DecodePlan(
                    [[n.detach() for n in ns] for ns in norms], [s[0] for s in specs],
                    [s[1] for s in specs],
                    [model.rope_cos, model.rope_sin, model.rope_local_cos, model.rope_local_sin],
                    [int(layer.self_attn.window) for layer in model.layers],
                    [float(c.norm_eps), float(model.layers[0].self_attn.scale if model.layers
                                              else c.attn_scale),
                     float(c.final_softcap or 0.0), float(c.act == "gelu_tanh")])
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
    ext = _kernel()
    if ext is None or not hasattr(ext, "DecodePlan"):
        return None
    plan = _PLANS.get(model)
    if plan is None or not plan.current(model) or plan.int8_act != int8_activations():
        plan = _Plan(model, ext)
        _PLANS[model] = plan
    return plan if plan.ok else None


def _ready(model: Transformer, cache: KVCache, last_position: int) -> _Plan | None:
    """The plan for a call on this cache reaching ``last_position``, or None (see above)."""
    if cache.k[0].dtype != torch.float32 or last_position >= cache.max_seq_len:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return None
    if isinstance(model, Transformer):
        model._check_rope()  # tables rebuilt here are new buffers: the plan follows them
    plan = plan_for(model)
    if plan is None or plan.hooked():
        return None
    return plan


def decode(
    model: Transformer, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    """Logits (B, V) for one new token in each of the first B cache rows, or None (see above).

    More than 8 rows go 8 at a time (each pass reads the weights once for its rows): a server's
    batch of 16 still decodes fused instead of dropping to the PyTorch path.
    """
    B = tokens.shape[0]
    plan = _ready(model, cache, int(positions.max()))
    if plan is None:
        return None
    x = model.embed(tokens.reshape(B))  # Gemma's sqrt(D) scale included
    if x.dtype != torch.float32:
        return None
    x, positions, rows = x.contiguous(), positions.reshape(B).to(torch.long), torch.arange(B)
    out = [plan.plan.step(x[i:i + MAX_ROWS].contiguous(), positions[i:i + MAX_ROWS],
                          cache.k, cache.v, rows[i:i + MAX_ROWS]) for i in range(0, B, MAX_ROWS)]
    return out[0] if len(out) == 1 else torch.cat(out)


def verify(model: Transformer, cache: KVCache, row: int, ids: list[int], start: int) -> torch.Tensor | None:
    """Logits (T, V) after each of ``ids`` fed to cache row ``row`` at positions start..start+T-1
    (causal among themselves), as ``forward_at`` gives them, or None (see above).

    A speculative draft's verification: up to 8 tokens share one pass over the weights (each
    weight row is read once for all of them), so checking k drafts costs about one decode step;
    longer runs go 8 at a time.
    """
    T = len(ids)
    if T == 0 or not 0 <= row < cache.batch_size:
        return None
    plan = _ready(model, cache, start + T - 1)
    if plan is None:
        return None
    x = model.embed(torch.tensor(ids, dtype=torch.long))  # (T, D)
    if x.dtype != torch.float32:
        return None
    positions = torch.arange(start, start + T)
    rows = torch.full((T,), row, dtype=torch.long)
    out = [plan.plan.step(x[i:i + MAX_ROWS].contiguous(), positions[i:i + MAX_ROWS],
                          cache.k, cache.v, rows[i:i + MAX_ROWS]) for i in range(0, T, MAX_ROWS)]
    return out[0] if len(out) == 1 else torch.cat(out)
