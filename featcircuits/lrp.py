"""LRP propagation rules for RelP, switched on by a context manager around a trace.

Every rule keeps the forward value *bit for bit* and only changes the backward pass. The
trick used throughout is ``straight(value, surrogate) = value.detach() + (surrogate -
surrogate.detach())``: its value is ``value`` (plus an exact zero) and its gradient is the
surrogate's. The rules (Jafari et al. 2025, "RelP"; the table in DESIGN.md):

=========  ==========================================  =======================================
rule       operation                                   backward
=========  ==========================================  =======================================
``ln``     LayerNorm / RMSNorm (also Gemma q/k norms)  normalising scale treated as a constant
``identity`` elementwise activation f (GELU, SiLU)     multiplies by f(x)/x instead of f'(x)
``half``   product of two live factors (gated MLP)     each factor receives half its gradient
``half-qk`` attention scores ``q . k`` (two live        the half rule on the score product:
           factors: both depend on the residual)       query and key each get half the gradient
``ah``     attention                                   softmax pattern detached
=========  ==========================================  =======================================

``half-qk`` is off by default (the RelP authors' code has no such rule); it is the half
rule's own definition applied to the one other product of two live factors in a block.
On Gemma 3 270M it is what closes the IOI residual gap (``results/agreement/rules``).

Linear layers and embeddings keep their plain gradient (the 0-rule).

How the rules reach the model: ``install`` replaces the ``forward`` of the affected
modules (norms, MLP activations, gated MLPs) with a version that checks the active rule
set, and registers an attention function that detaches the pattern when ``ah`` is on.
It runs *before* nnsight wraps the model, so nnsight's controllers run these forwards as
the module bodies and every site stays interceptable. With no rule active the original
forward runs unchanged. (LXT, "LRP-eXplains-Transformers", patches whole modules the same
way; we cannot import it because it targets its own module classes, not HF's.)
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .errors import UserError

RULES = ("ln", "identity", "half", "half-qk", "ah")
# The RelP authors' defaults: LN + identity + half, the AH-rule available but off.
DEFAULT_RULES = ("ln", "identity", "half")
ATTN_IMPLEMENTATION = "featcircuits_lrp"

_active: frozenset[str] = frozenset()


def active_rules() -> frozenset[str]:
    return _active


def parse_rules(rules: Iterable[str] | str | None) -> frozenset[str]:
    """``"ln,identity,half"`` or an iterable -> a validated frozenset ("default" allowed)."""
    if rules is None or rules == "default":
        return frozenset(DEFAULT_RULES)
    if isinstance(rules, str):
        rules = [r.strip() for r in rules.split(",") if r.strip()]
    out = set()
    for r in rules:
        if r == "default":
            out |= set(DEFAULT_RULES)
        elif r not in RULES:
            raise UserError(f"unknown LRP rule {r!r}; choose from {', '.join(RULES)}")
        else:
            out.add(r)
    return frozenset(out)


@contextlib.contextmanager
def lrp_rules(rules: Iterable[str] | str | None = DEFAULT_RULES) -> Iterator[frozenset[str]]:
    """Switch LRP rules on for the models featcircuits wrapped (forward values unchanged)."""
    global _active
    previous = _active
    _active = parse_rules(rules)
    try:
        yield _active
    finally:
        _active = previous


def straight(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def identity_rule(x: torch.Tensor, y: torch.Tensor, fn: Any) -> torch.Tensor:
    """``y = fn(x)`` whose backward multiplies by ``y / x`` (the identity rule).

    Near ``x = 0`` the ratio is replaced by its limit ``fn(eps) / eps``.
    """
    eps = 1e-6
    small = x.abs() < eps
    limit = fn(torch.full((), eps, dtype=x.dtype)) / eps
    ratio = torch.where(small, limit, y / torch.where(small, torch.ones_like(x), x))
    return straight(y, x * ratio.detach())


def half_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` in the forward pass; each factor receives half its gradient."""
    return straight(a * b, 0.5 * (a * b.detach() + a.detach() * b))


# --------------------------------------------------------------------------------------
# Forwards installed on the modules


def _norm_surrogate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm recomputed with its normalising scale detached (the LN-rule)."""
    if isinstance(module, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        y = (x - mean) / torch.sqrt(var + module.eps).detach()
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        return y
    xf = x.float()
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = module.variance_epsilon
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
    if type(module).__name__.startswith("Gemma"):
        # Gemma's RMSNorm scales by (1 + weight) in fp32 before casting back.
        return (y * (1.0 + module.weight.float())).type_as(x)
    return module.weight * y.to(x.dtype)


def _norm_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    y = type(self).forward(self, x, *args, **kwargs)
    if "ln" not in _active:
        return y
    return straight(y, _norm_surrogate(self, x))


def _act_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fn = self._featcircuits_fn
    y = fn(x)
    if "identity" not in _active:
        return y
    return identity_rule(x, y, fn)


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate = self.act_fn(self.gate_proj(x))
    up = self.up_proj(x)
    h = half_product(gate, up) if "half" in _active else gate * up
    return self.down_proj(h)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def install(hf_model: nn.Module, adapter: Any) -> None:
    """Install the rule-aware forwards on an HF model (idempotent). Called by ``models.wrap``."""
    if getattr(hf_model, "_featcircuits_lrp", False):
        return
    for module in hf_model.modules():
        if _is_norm(module):
            module.forward = types.MethodType(_norm_forward, module)
    for layer in range(adapter.n_layers):
        mlp = adapter.block(hf_model, layer).mlp
        act_name = "act_fn" if hasattr(mlp, "act_fn") else "act"
        act = getattr(mlp, act_name)
        if not getattr(act, "_featcircuits_fn", None):
            # Keep the class's own forward as the activation, then route through the rule.
            act._featcircuits_fn = types.MethodType(type(act).forward, act)
            act.forward = types.MethodType(_act_forward, act)
        if hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            mlp.forward = types.MethodType(_gated_mlp_forward, mlp)
    _register_attention()
    hf_model.config._attn_implementation = ATTN_IMPLEMENTATION
    for sub in hf_model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not hf_model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_IMPLEMENTATION
    hf_model._featcircuits_lrp = True


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (query heads x key heads with grouped KV), pattern detached under ``ah``.

    Written out rather than taken from a modeling file because each family keeps its own
    private copy; this one serves all of them and is where the AH- and half-qk rules live.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    key_t = key.transpose(2, 3)
    scores = torch.matmul(query, key_t)
    if "half-qk" in _active:
        scores = straight(scores, 0.5 * (torch.matmul(query, key_t.detach()) + torch.matmul(query.detach(), key_t)))
    scores = scores * scaling
    if softcap is not None:
        capped = torch.tanh(scores / softcap) * softcap
        if "identity" in _active:
            capped = identity_rule(scores, capped, lambda s: torch.tanh(s / softcap) * softcap)
        scores = capped
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    else:
        q_len, k_len = scores.shape[-2:]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if "ah" in _active:
        pattern = pattern.detach()
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)
