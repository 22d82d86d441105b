"""LRP propagation rules for RelP, switched on by a context manager around a trace.

(Longer than ~400 lines on purpose: the rule-aware forwards of norms, activations, gated MLPs
and attention share one switch, one tape and one ``straight`` trick; split apart they would
each need the others' state.)

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

``half-qk`` is not in any preset (the RelP authors' code has no such rule); it is the half
rule's own definition applied to the one other product of two live factors in a block.
The authors' set ``ln, identity, half`` is the preset ``paper``.

**Two-point rules** (ours, RelP's default; ``results/README.md``, "LRP rules"). The
identity rule is the secant of ``f`` between ``x`` and 0, and the half rule is the
product's exact split when the other factor goes to 0: LRP linearises every operation
towards a zero reference. RelP multiplies by ``a_p - a_c``, a move towards the
*counterfactual*; the same rules with the counterfactual run as the reference make each
operation's linearisation exact for that move (the idea of DeepLIFT's rescale rule):

=================  ==========================================  ================================
rule               operation                                   backward
=================  ==========================================  ================================
``secant``         elementwise activation f                    ``(f(x_c) - f(x_p)) / (x_c - x_p)``
``mid``            every product of two live factors (gated    each factor's gradient uses the
                   MLP, ``q . k``, pattern x values)           other's clean/counterfactual mean
``mid-softmax``    attention softmax                           Jacobian at the mean scores,
                                                               secant-corrected (Broyden)
``norm-secant``    LayerNorm / RMSNorm                         exact two-point split of the
                                                               norm (scale's secant included)
=================  ==========================================  ================================

They read the counterfactual values from a ``ReferenceTape`` recorded during the
counterfactual forward RelP already runs (``recording``/``replaying``), so they cost no
extra pass. Without a tape they fall back to the zero reference: ``secant`` -> identity,
``mid`` -> half, ``mid-softmax`` -> plain gradient, ``norm-secant`` -> the LN-rule.
With all four (the preset ``two-point``) every operation between a layer and the metric is
linearised exactly for the move to the counterfactual, so the node effects of any full
layer cut sum to ``m(patch) - m(clean)`` (tested on every family; ``install`` moves Gemma
2's final logit softcap into the output head so the rules reach it). Single nodes are still first-order
estimates: a node patched alone moves the rest of the model elsewhere than the full
counterfactual does (e.g. backup heads that compensate). ``TWO_POINT_RULES`` is the full set.

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

RULES = ("ln", "identity", "half", "half-qk", "ah", "secant", "mid", "mid-softmax", "norm-secant")
# The RelP authors' rules (preset ``paper``): LN + identity + half, the AH-rule available but off.
PAPER_RULES = ("ln", "identity", "half")
# Every operation linearised between the clean and the counterfactual run ("two-point").
TWO_POINT_RULES = ("norm-secant", "secant", "mid", "mid-softmax")
# RelP's default is two-point: against exact patching it beats the paper's rules on every
# Gemma 3 task and on a held-out Llama-family model (results/README.md, "LRP rules").
DEFAULT_RULES = TWO_POINT_RULES
REFERENCE_RULES = frozenset({"secant", "mid", "mid-softmax", "norm-secant"})  # these read a ReferenceTape
PRESETS = {"default": DEFAULT_RULES, "two-point": TWO_POINT_RULES, "paper": PAPER_RULES}
ATTN_IMPLEMENTATION = "featcircuits_lrp"

_active: frozenset[str] = frozenset()


def active_rules() -> frozenset[str]:
    return _active


def parse_rules(rules: Iterable[str] | str | None) -> frozenset[str]:
    """``"ln,identity,half"`` or an iterable -> a validated frozenset (the presets
    ``default`` (= ``two-point``), ``two-point`` and ``paper`` allowed; None = the default)."""
    if rules is None:
        return frozenset(DEFAULT_RULES)
    if isinstance(rules, str):
        rules = [r.strip() for r in rules.split(",") if r.strip()]
    out = set()
    for r in rules:
        if r in PRESETS:
            out |= set(PRESETS[r])
        elif r not in RULES:
            raise UserError(f"unknown LRP rule {r!r}; choose from {', '.join(RULES)} "
                            f"(or the presets {', '.join(PRESETS)})")
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


def rules_key(rules: Iterable[str] | str | None) -> str:
    """The resolved rule set as a stable string (for cache and checkpoint keys: a preset's
    name alone would outlive a change of the preset)."""
    return ",".join(r for r in RULES if r in parse_rules(rules))


def needs_reference(rules: Iterable[str]) -> bool:
    """Whether a rule set reads the counterfactual run (a ``ReferenceTape``)."""
    return bool(REFERENCE_RULES & set(rules))


class ReferenceTape:
    """Values the rule-aware forwards saw during a counterfactual forward, in call order.

    ``recording(tape)`` around the counterfactual forward fills it; ``replaying(tape)``
    around the clean forward (same batch shape, same modules, same order) hands each call
    the counterfactual values of its own inputs."""

    def __init__(self) -> None:
        self.items: list[tuple[int, tuple[torch.Tensor, ...]]] = []

    def __len__(self) -> int:
        return len(self.items)


_tape: ReferenceTape | None = None
_tape_mode: str | None = None
_tape_pos = 0


@contextlib.contextmanager
def _tape_context(tape: ReferenceTape | None, mode: str) -> Iterator[ReferenceTape | None]:
    global _tape, _tape_mode, _tape_pos
    saved = (_tape, _tape_mode, _tape_pos)
    if tape is not None:
        if mode == "record":
            tape.items.clear()
        _tape, _tape_mode, _tape_pos = tape, mode, 0
    try:
        yield tape
    finally:
        _tape, _tape_mode, _tape_pos = saved


def recording(tape: ReferenceTape | None) -> contextlib.AbstractContextManager:
    """Record the rule-aware forwards' inputs into ``tape`` (no-op for ``None``)."""
    return _tape_context(tape, "record")


def replaying(tape: ReferenceTape | None) -> contextlib.AbstractContextManager:
    """Hand the recorded counterfactual values to the two-point rules (no-op for ``None``)."""
    return _tape_context(tape, "replay")


def _reference(owner: Any, *values: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """Record ``values`` (recording), or return the counterfactual ones of this call (replaying)."""
    global _tape_pos
    if _tape_mode == "record":
        _tape.items.append((id(owner), tuple(v.detach() for v in values)))
        return None
    if _tape_mode == "replay":
        if _tape_pos >= len(_tape.items) or _tape.items[_tape_pos][0] != id(owner):
            raise RuntimeError("the clean forward does not follow the recorded counterfactual forward "
                               "(different modules or order); two-point rules need the same batch shape")
        ref = _tape.items[_tape_pos][1]
        _tape_pos += 1
        if any(r.shape != v.shape for r, v in zip(ref, values)):
            raise RuntimeError("counterfactual and clean values differ in shape; two-point rules need "
                               "clean and counterfactual prompts padded to the same length")
        return ref
    return None


def _if_active(rule: str, ref: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    # Every rule-aware forward records (and replays) its values whenever a tape is on, so the
    # counterfactual forward, which runs without rules, leaves the same entries in the same order.
    return ref if rule in _active else None


def secant_rule(x: torch.Tensor, y: torch.Tensor, x_ref: torch.Tensor, y_ref: torch.Tensor, fn: Any) -> torch.Tensor:
    """``y = fn(x)`` whose backward multiplies by the secant slope between ``x_ref`` and ``x``.

    Where the two points (nearly) coincide the slope is ``fn'`` at their mean. The slope is
    computed in float32 (in bfloat16 a difference quotient keeps ~2 significant digits) and
    cast back, so the forward value and dtype stay ``y``'s."""
    xf, rf, yf, yrf = x.float(), x_ref.float(), y.float(), y_ref.float()
    dx = xf - rf
    far = dx.abs() > 1e-4
    with torch.enable_grad():
        mid = (0.5 * (xf + rf)).detach().requires_grad_(True)
        (slope_mid,) = torch.autograd.grad(fn(mid).sum(), mid)
    slope = torch.where(far, (yf - yrf) / torch.where(far, dx, torch.ones_like(dx)), slope_mid)
    return straight(y, x * slope.detach().to(x.dtype))


def mid_product(a: torch.Tensor, b: torch.Tensor, a_ref: torch.Tensor, b_ref: torch.Tensor,
                product: Any = torch.mul) -> torch.Tensor:
    """``product(a, b)`` (bilinear) whose backward gives each factor the gradient at the
    other's mean of the two points: ``P(a, b) - P(a_ref, b_ref) = P(da, b_mean) + P(a_mean, db)``
    exactly, so the product adds no linearisation error."""
    a_mid, b_mid = (0.5 * (a + a_ref)).detach(), (0.5 * (b + b_ref)).detach()
    return straight(product(a, b), product(a, b_mid) + product(a_mid, b))


def straight(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass (in
    ``value``'s dtype: a float32 surrogate must not promote a bfloat16 forward)."""
    return value.detach() + (surrogate - surrogate.detach()).to(value.dtype)


def identity_rule(x: torch.Tensor, y: torch.Tensor, fn: Any) -> torch.Tensor:
    """``y = fn(x)`` whose backward multiplies by ``y / x`` (the identity rule).

    Near ``x = 0`` the ratio is replaced by its limit ``fn(eps) / eps``. The ratio is taken in
    float32 and cast back to ``x``'s dtype (forward value and dtype unchanged).
    """
    eps = 1e-6
    xf = x.float()
    small = xf.abs() < eps
    limit = fn(torch.full((), eps, dtype=torch.float32, device=x.device)) / eps
    ratio = torch.where(small, limit, y.float() / torch.where(small, torch.ones_like(xf), xf))
    return straight(y, x * ratio.detach().to(x.dtype))


def half_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b`` in the forward pass; each factor receives half its gradient."""
    return straight(a * b, 0.5 * (a * b.detach() + a.detach() * b))


# --------------------------------------------------------------------------------------
# Forwards installed on the modules


def _norm_eps(module: nn.Module) -> float:
    eps = getattr(module, "eps", None)
    return module.variance_epsilon if eps is None else eps


def _norm_weighted(module: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a norm's own elementwise weight (and bias) to its normalised ``y``, in ``x``'s dtype."""
    if isinstance(module, nn.LayerNorm):
        y = y.to(x.dtype)
        if module.weight is not None:
            y = y * module.weight
        return y + module.bias if module.bias is not None else y
    if type(module).__name__.startswith("Gemma"):
        # Gemma's RMSNorm scales by (1 + weight) in fp32 before casting back.
        return (y * (1.0 + module.weight.float())).type_as(x)
    return module.weight * y.to(x.dtype)


def _norm_surrogate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm recomputed with its normalising scale detached (the LN-rule)."""
    if isinstance(module, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return _norm_weighted(module, (x - mean) / torch.sqrt(var + module.eps).detach(), x)
    xf = x.float()
    return _norm_weighted(module, xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _norm_eps(module)).detach(), x)


def _norm_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    y = type(self).forward(self, x, *args, **kwargs)
    ref = _if_active("norm-secant", _reference(self, x))
    if ref is not None:
        return straight(y, _norm_secant_surrogate(self, x, ref[0]))
    if "ln" not in _active and "norm-secant" not in _active:
        return y
    return straight(y, _norm_surrogate(self, x))  # also ``norm-secant`` without a tape


def _norm_secant_surrogate(module: nn.Module, x: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """The norm's exact two-point linearisation between ``x_ref`` and ``x``.

    A norm is ``z * g(u) * w`` with ``z`` = x (RMSNorm) or x centred (LayerNorm), ``u`` =
    mean(z^2) + eps and ``g(u) = u^-1/2``. Exactly: ``d(z g) = dz g_mid + z_mid dg`` (a
    product), ``dg = s du`` with ``s`` the secant slope of g, and ``du = 2/d sum(z_mid dz)``
    (a square). The surrogate's gradient is that multiplier; the bias drops out."""
    layer_norm = isinstance(module, nn.LayerNorm)
    eps = _norm_eps(module)

    def parts(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = v.float()
        if layer_norm:
            z = z - z.mean(-1, keepdim=True)
        return z, z.pow(2).mean(-1, keepdim=True) + eps

    z, u = parts(x)
    z_ref, u_ref = (t.detach() for t in parts(x_ref))
    u_c = u.detach()
    g_c, g_ref = torch.rsqrt(u_c), torch.rsqrt(u_ref)
    du = u_c - u_ref
    far = du.abs() > 1e-6 * u_c
    u_mid = 0.5 * (u_c + u_ref)
    slope = torch.where(far, (g_c - g_ref) / torch.where(far, du, torch.ones_like(du)), -0.5 * u_mid.pow(-1.5))
    z_mid, g_mid = 0.5 * (z.detach() + z_ref), 0.5 * (g_c + g_ref)
    surrogate = z * g_mid + z_mid * slope * (2.0 / z.shape[-1]) * (z_mid * z).sum(-1, keepdim=True)
    return _norm_weighted(module, surrogate, x)


def _elementwise(owner: Any, x: torch.Tensor, fn: Any) -> torch.Tensor:
    """``fn(x)`` for an elementwise nonlinearity (activation, softcap) under the active rules:
    the secant to the counterfactual (``secant`` with a tape), the secant to 0 (``identity``,
    or ``secant`` without a tape), or the plain gradient."""
    y = fn(x)
    ref = _if_active("secant", _reference(owner, x, y))
    if ref is not None:
        return secant_rule(x, y, *ref, fn)
    if "identity" in _active or "secant" in _active:
        return identity_rule(x, y, fn)
    return y


def _act_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _elementwise(self, x, self._featcircuits_fn)


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate = self.act_fn(self.gate_proj(x))
    up = self.up_proj(x)
    ref = _if_active("mid", _reference(self, gate, up))
    if ref is not None:
        h = mid_product(gate, up, *ref)
    elif "half" in _active or "mid" in _active:  # ``mid`` without a tape: the half rule
        h = half_product(gate, up)
    else:
        h = gate * up
    return self.down_proj(h)


def _move_logit_softcap(hf_model: nn.Module) -> None:
    """Gemma 2 caps its logits (``tanh(z / c) * c``) in the model's forward, outside any
    module; move the same computation into the output head so that the rules reach it
    (identity rule, or the secant with a tape). Values are unchanged."""
    cap = getattr(hf_model.config, "final_logit_softcapping", None)
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if cap is None or head is None:
        return
    head._featcircuits_cap = float(cap)
    head._featcircuits_head = head.forward  # the class's, or the one models.wrap installed
    head.forward = types.MethodType(_capped_head_forward, head)
    hf_model.config.final_logit_softcapping = None


def _capped_head_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    cap = self._featcircuits_cap
    return _elementwise(self, self._featcircuits_head(x), lambda v: torch.tanh(v / cap) * cap)


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
        parts = adapter.mlp_parts(hf_model, layer)
        act = parts.act
        if not getattr(act, "_featcircuits_fn", None):
            # Keep the class's own forward as the activation, then route through the rule.
            act._featcircuits_fn = types.MethodType(type(act).forward, act)
            act.forward = types.MethodType(_act_forward, act)
        if parts.gated:
            parts.mlp.forward = types.MethodType(_gated_mlp_forward, parts.mlp)
    _move_logit_softcap(hf_model)
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
    mid = "mid" in _active
    ref = _if_active("mid", _reference(module, query, key_t, value))
    if ref is not None:
        scores = mid_product(query, key_t, ref[0], ref[1], torch.matmul)
    elif "half-qk" in _active or mid:  # ``mid`` without a tape: the half rule
        scores = half_product_matmul(query, key_t)
    else:
        scores = torch.matmul(query, key_t)
    scores = scores * scaling
    if softcap is not None:
        scores = _elementwise(module, scores, lambda v: torch.tanh(v / softcap) * softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    else:
        q_len, k_len = scores.shape[-2:]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    score_ref = _if_active("mid-softmax", _reference(module, scores))
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if score_ref is not None:
        pattern = straight(pattern, _softmax_at_mean(scores, score_ref[0]).to(query.dtype))
    pattern_ref = _if_active("mid", _reference(module, pattern))
    if "ah" in _active:
        pattern = pattern.detach()
        out = torch.matmul(pattern, value)
    elif pattern_ref is not None:
        out = mid_product(pattern, value, pattern_ref[0], ref[2], torch.matmul)
    elif mid:
        out = half_product_matmul(pattern, value)
    else:
        out = torch.matmul(pattern, value)
    return out.transpose(1, 2).contiguous(), pattern


def half_product_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``; each factor receives half its gradient (the half rule for a matmul)."""
    return straight(torch.matmul(a, b), 0.5 * (torch.matmul(a, b.detach()) + torch.matmul(a.detach(), b)))


def _softmax_at_mean(scores: torch.Tensor, scores_ref: torch.Tensor) -> torch.Tensor:
    """A surrogate whose gradient is the softmax Jacobian at the mean of the two score sets,
    corrected by a rank-one (Broyden) secant update so that, along the move from
    ``scores_ref`` to ``scores``, it reproduces the change of the pattern exactly. Masked
    (-inf / finfo.min) entries stay out."""
    finite = torch.isfinite(scores) & (scores > torch.finfo(scores.dtype).min / 2)
    zero = torch.zeros((), dtype=torch.float32, device=scores.device)
    mean = torch.where(finite, 0.5 * (scores + scores_ref), scores)
    p = torch.softmax(mean.float(), dim=-1).detach()
    z = torch.where(finite, scores, zero).float()
    jz = p * (z - (p * z).sum(-1, keepdim=True))  # J_mean z, linear in z
    with torch.no_grad():
        ds = torch.where(finite, scores - scores_ref, zero).float()
        dp = torch.softmax(scores.float(), -1) - torch.softmax(scores_ref.float(), -1)
        miss = dp - p * (ds - (p * ds).sum(-1, keepdim=True))  # what J_mean gets wrong along ds
        norm2 = (ds * ds).sum(-1, keepdim=True)
        coef = torch.where(norm2 > 1e-12, miss / norm2.clamp(min=1e-12), zero)
    return jz + coef * (ds * z).sum(-1, keepdim=True)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)
