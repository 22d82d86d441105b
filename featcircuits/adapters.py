"""Per-family module paths: the only place in featcircuits that knows where sites live.

A *site* is a place in the model whose activation (batch x pos x d_model) gets a
dictionary: ``embed``, and for every layer ``attn_l`` (attention block output before it
joins the residual), ``mlp_l`` (MLP block output) and ``resid_l`` (the block's output).
Sites are always listed in forward order, which is the order nnsight must visit them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError

SITE_KINDS = ("embed", "attn", "mlp", "resid")


@dataclass(frozen=True)
class Site:
    """One place in the model that carries a dictionary."""

    name: str  # "embed", "attn_3", "mlp_3", "resid_3"
    kind: str  # one of SITE_KINDS
    layer: int  # -1 for embed
    path: str  # module path in the HF model, e.g. "model.layers.3.post_attention_layernorm"
    tuple_output: bool  # the module returns (tensor, ...) and the site is element 0


def site_kind(name: str) -> str:
    """``"resid_5"`` -> ``"resid"``; ``"embed"`` -> ``"embed"``."""
    return name.split("_")[0]


def site_layer(name: str) -> int:
    return -1 if name == "embed" else int(name.split("_")[1])


@dataclass(frozen=True)
class Adapter:
    """Where one family puts its sites, and how its blocks are wired."""

    family: str
    layers: str  # path of the ModuleList of blocks
    embed: str  # path of the module whose output is the residual stream entering block 0
    attn: str  # path inside a block
    attn_tuple: bool
    mlp: str  # path inside a block
    parallel: bool  # attention and MLP both read resid_{l-1} (GPT-NeoX / Pythia)
    n_layers: int
    d_model: int

    def sites(self) -> list[Site]:
        """All sites in forward order: embed, then attn_l, mlp_l, resid_l per layer."""
        out = [Site("embed", "embed", -1, self.embed, False)]
        for layer in range(self.n_layers):
            block = f"{self.layers}.{layer}"
            out.append(Site(f"attn_{layer}", "attn", layer, f"{block}.{self.attn}", self.attn_tuple))
            out.append(Site(f"mlp_{layer}", "mlp", layer, f"{block}.{self.mlp}", False))
            out.append(Site(f"resid_{layer}", "resid", layer, block, False))
        return out

    def site(self, name: str) -> Site:
        for s in self.sites():
            if s.name == name:
                return s
        raise UserError(
            f"unknown site {name!r} for this {self.family} model with {self.n_layers} layers; "
            f"sites are embed, attn_L, mlp_L, resid_L for L in 0..{self.n_layers - 1}"
        )

    def block(self, model: Any, layer: int) -> Any:
        return resolve(model, f"{self.layers}.{layer}")


# model_type (from the HF config) -> module layout. One small table per family.
_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt_neox": dict(
        family="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in",
        attn="attention", attn_tuple=True, mlp="mlp",
    ),
    "gpt2": dict(
        # transformer.drop is the dropout after wte + wpe: the residual entering block 0.
        family="gpt2", layers="transformer.h", embed="transformer.drop",
        attn="attn", attn_tuple=True, mlp="mlp", parallel=False,
    ),
    "llama": dict(
        family="llama", layers="model.layers", embed="model.embed_tokens",
        attn="self_attn", attn_tuple=True, mlp="mlp", parallel=False,
    ),
    # Gemma 2 / 3 normalise each block's output before it joins the residual; Gemma Scope
    # dictionaries read after those post-norms, so the sites sit there too.
    "gemma2": dict(
        family="gemma2", layers="model.layers", embed="model.embed_tokens",
        attn="post_attention_layernorm", attn_tuple=False, mlp="post_feedforward_layernorm",
        parallel=False,
    ),
    "gemma3": dict(
        family="gemma3", layers="model.layers", embed="model.embed_tokens",
        attn="post_attention_layernorm", attn_tuple=False, mlp="post_feedforward_layernorm",
        parallel=False,
    ),
}
_ALIASES = {
    "gemma3_text": "gemma3", "qwen2": "llama", "qwen3": "llama", "mistral": "llama",
    "smollm": "llama", "smollm3": "llama",
}


def supported_model_types() -> list[str]:
    return sorted(set(_FAMILIES) | set(_ALIASES))


def adapter_for(config: Any) -> Adapter:
    """The adapter for an HF config; a clear error naming the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    key = _ALIASES.get(model_type, model_type)
    if key not in _FAMILIES:
        raise UserError(
            f"unsupported architecture {model_type!r}; featcircuits supports "
            f"{', '.join(supported_model_types())}"
        )
    spec = dict(_FAMILIES[key])
    if key == "gpt_neox":
        spec["parallel"] = bool(getattr(config, "use_parallel_residual", True))
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    return Adapter(n_layers=int(n_layers), d_model=int(d_model), **spec)


def resolve(root: Any, path: str) -> Any:
    """Follow a dotted path (digits index into ModuleLists); works on torch modules and
    on nnsight envoys alike."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
