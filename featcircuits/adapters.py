"""Per-family module paths: the only place in featcircuits that knows where sites live.

A *site* is a place in the model whose activation (batch x pos x width) gets a
dictionary: ``embed``, and for every layer ``attn_l`` (attention block output before it
joins the residual), ``mlp_l`` (MLP block output) and ``resid_l`` (the block's output).
Sites are always listed in forward order, which is the order nnsight must visit them.

An attention site is read at one of two points, chosen by its dictionary's hook: the
attention block's output (width d_model, the default), or ``hook_z``, the heads' outputs
concatenated before the output projection (width n_heads * head_dim; Gemma Scope's
attention SAEs). At z the site is the *input* of ``o_proj``: features and error live
there, ``o_proj`` (and Gemma's post-attention norm) act on ``z_hat + err`` after the
splice, so every site downstream sees ``o_proj(z_hat + err)`` with no special case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection

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
    reads: str = "output"  # READS_OUTPUT: the module's output; READS_Z: hook_z, the first input of ``path`` (o_proj)

    @property
    def reads_input(self) -> bool:
        """The site is the first input of its module (hook_z at o_proj), not its output."""
        return self.reads == READS_Z


READS_OUTPUT, READS_Z = "output", "z"


def site_kind(name: str) -> str:
    """``"resid_5"`` -> ``"resid"``; ``"embed"`` -> ``"embed"``."""
    return name.split("_")[0]


def site_layer(name: str) -> int:
    """``"resid_5"`` -> 5; ``"embed"`` -> -1."""
    return -1 if name == "embed" else int(name.split("_")[1])


def transformer_lens_hooks(site: Site) -> set[str]:
    """The TransformerLens hook names (what sae-lens records as a hub SAE's ``hook_name``)
    that read the same activation as ``site``: a hub dictionary trained elsewhere fits here."""
    if site.kind == "embed":
        return {"blocks.0.hook_resid_pre", "hook_embed"}
    if site.reads == READS_Z:
        return {f"blocks.{site.layer}.attn.hook_z"}
    return {{"attn": f"blocks.{site.layer}.hook_attn_out", "mlp": f"blocks.{site.layer}.hook_mlp_out",
             "resid": f"blocks.{site.layer}.hook_resid_post"}[site.kind]}


def reads_for_hook(hook_name: str | None) -> str:
    """Where a dictionary recorded as reading the TransformerLens hook ``hook_name`` sits:
    ``READS_Z`` for ``blocks.L.attn.hook_z``, ``READS_OUTPUT`` otherwise (or unrecorded)."""
    parts = (hook_name or "").split(".")
    is_z = len(parts) == 4 and parts[0] == "blocks" and parts[1].isdigit() and parts[2:] == ["attn", "hook_z"]
    return READS_Z if is_z else READS_OUTPUT


def site_name(kind: str, layer: int) -> str:
    """The name of a site: ``site_name("resid", 5)`` -> ``"resid_5"``; layer -1 of resid is embed."""
    return "embed" if kind == "embed" or (kind == "resid" and layer < 0) else f"{kind}_{layer}"


#: Where each site kind sits inside its layer, in forward order (embed below layer 0).
SITE_BAND = {"embed": -1, "attn": 0, "mlp": 1, "resid": 2}


def site_band(name: str, default: int = 3) -> int:
    """A site's band inside its layer (``SITE_BAND``); ``default`` for a name of no known kind."""
    return SITE_BAND.get(site_kind(name), default)


def site_row(name: str) -> int:
    """A site's index in forward order (embed 0, attn_l 3l+1, mlp_l 3l+2, resid_l 3l+3):
    the row of a drawing; exports sort and place sites by the same order."""
    if name == "embed":
        return 0
    return 3 * site_layer(name) + site_band(name) + 1


def site_sort_key(name: str) -> tuple[int, int]:
    """Forward order of a site name without an adapter (files read back); unknown names last."""
    if name == "embed":
        return (-1, -1)
    kind, _, layer = name.partition("_")
    return (int(layer) if layer.isdigit() else 10**6, SITE_BAND.get(kind, 3))


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
    mlp_module: str = "mlp"  # path inside a block of the MLP itself (the site may sit after its post-norm)
    # paths inside a block from hook_z to the attention site's output: the output projection
    # (whose input is z), then any norm before the site (Gemma's post-attention norm)
    z_readout: tuple[str, ...] = ()
    z_width: int = 0  # n_heads * head_dim: the width of hook_z

    def sites(self, z: Collection[str] = ()) -> list[Site]:
        """All sites in forward order: embed, then attn_l, mlp_l, resid_l per layer.

        ``z``: names of attention sites read at hook_z (the input of the output projection)
        instead of the attention block's output; same names, same place in the data flow."""
        z = set(z)
        bad = sorted(z - {f"attn_{layer}" for layer in range(self.n_layers)})
        if bad:
            raise UserError(f"only attention sites (attn_L) can read hook_z, not {', '.join(bad)}")
        out = [Site("embed", "embed", -1, self.embed, False)]
        for layer in range(self.n_layers):
            block = f"{self.layers}.{layer}"
            attn = f"attn_{layer}"
            if attn in z:
                out.append(Site(attn, "attn", layer, f"{block}.{self.z_readout[0]}", False, READS_Z))
            else:
                out.append(Site(attn, "attn", layer, f"{block}.{self.attn}", self.attn_tuple))
            out.append(Site(f"mlp_{layer}", "mlp", layer, f"{block}.{self.mlp}", False))
            out.append(Site(f"resid_{layer}", "resid", layer, block, False))
        return out

    def site_width(self, site: Site) -> int:
        """The width of a site's activation: ``z_width`` at hook_z, ``d_model`` elsewhere."""
        return self.z_width if site.reads == READS_Z else self.d_model

    def z_readout_modules(self, model: Any, layer: int) -> list[Any]:
        """The modules of ``layer`` that take hook_z to the attention site's output, in order
        (the output projection first): what a z feature's direct effect passes through."""
        return [resolve(self.block(model, layer), path) for path in self.z_readout]

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

    def upstream(self, site: str) -> list[str]:
        """The sites with a direct path into ``site`` (intermediate sites held fixed):
        attn_l <- resid_{l-1}; mlp_l <- resid_{l-1} (+ attn_l unless parallel);
        resid_l <- resid_{l-1}, attn_l, mlp_l; resid_{-1} is embed."""
        if site == "embed":
            return []
        kind, layer = site_kind(site), site_layer(site)
        prev = site_name("resid", layer - 1)
        if kind == "attn":
            return [prev]
        if kind == "mlp":
            return [prev] if self.parallel else [prev, site_name("attn", layer)]
        return [prev, site_name("attn", layer), site_name("mlp", layer)]

    @property
    def last_resid(self) -> str:
        """The last residual site: the one that feeds the metric."""
        return site_name("resid", self.n_layers - 1)

    def mlp_parts(self, model: Any, layer: int) -> "MLPParts":
        """The MLP module of ``layer``, its activation module (and its attribute name), and
        whether it is gated (``act(gate_proj(x)) * up_proj(x)``): what the LRP rules patch."""
        mlp = resolve(self.block(model, layer), self.mlp_module)
        act_name = "act_fn" if hasattr(mlp, "act_fn") else "act"
        gated = hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")
        return MLPParts(mlp, getattr(mlp, act_name), gated)


@dataclass(frozen=True)
class MLPParts:
    """What the LRP rules need of one MLP (see ``Adapter.mlp_parts``)."""

    mlp: Any
    act: Any
    gated: bool


# model_type (from the HF config) -> module layout. One small table per family.
_FAMILIES: dict[str, dict[str, Any]] = {
    "gpt_neox": dict(
        family="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in",
        attn="attention", attn_tuple=True, mlp="mlp", z_readout=("attention.dense",),
    ),
    "gpt2": dict(
        # transformer.drop is the dropout after wte + wpe: the residual entering block 0.
        family="gpt2", layers="transformer.h", embed="transformer.drop",
        attn="attn", attn_tuple=True, mlp="mlp", parallel=False, z_readout=("attn.c_proj",),
    ),
    "llama": dict(
        family="llama", layers="model.layers", embed="model.embed_tokens",
        attn="self_attn", attn_tuple=True, mlp="mlp", parallel=False, z_readout=("self_attn.o_proj",),
    ),
    # Gemma 2 / 3 normalise each block's output before it joins the residual; Gemma Scope
    # dictionaries read after those post-norms, so the sites sit there too.
    "gemma2": dict(
        family="gemma2", layers="model.layers", embed="model.embed_tokens",
        attn="post_attention_layernorm", attn_tuple=False, mlp="post_feedforward_layernorm",
        parallel=False, z_readout=("self_attn.o_proj", "post_attention_layernorm"),
    ),
    "gemma3": dict(
        family="gemma3", layers="model.layers", embed="model.embed_tokens",
        attn="post_attention_layernorm", attn_tuple=False, mlp="post_feedforward_layernorm",
        parallel=False, z_readout=("self_attn.o_proj", "post_attention_layernorm"),
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
    n_heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    head_dim = getattr(config, "head_dim", None) or int(d_model) // int(n_heads)
    return Adapter(n_layers=int(n_layers), d_model=int(d_model), z_width=int(n_heads) * int(head_dim), **spec)


def resolve(root: Any, path: str) -> Any:
    """Follow a dotted path (digits index into ModuleLists); works on torch modules and
    on nnsight envoys alike."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
