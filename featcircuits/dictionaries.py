"""Sparse dictionaries: one interface, many formats, and named sets of them.

Every dictionary has ``encode(x) -> f``, ``decode(f) -> x_hat``, ``d_in`` and ``d_sae``.
Formats: sae-lens hub releases (``SAE.from_pretrained``), sae-lens folders (``cfg.json`` +
``sae_weights.safetensors``, ``SAE.load_from_disk``), dictionary_learning ``ae.pt`` state
dicts, and the identity dictionary (neurons as features). A ``DictionarySet`` maps site
names to dictionaries; ``featcircuits/data/registry.json`` (package data) names sets users can
ask for by name. A ``local`` set's folder (e.g. ``starter``) is looked up in the folder named
by the environment variable ``FEATCIRCUITS_SAES``, then in ``saes/`` of the source tree.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .adapters import READS_Z, Adapter, Site, reads_for_hook, transformer_lens_hooks
from .errors import UserError

REGISTRY = Path(__file__).resolve().parent / "data" / "registry.json"
SAES_ENV = "FEATCIRCUITS_SAES"  # a folder holding local dictionary sets, searched first
SOURCE_SAES = Path(__file__).resolve().parent.parent / "saes"  # the source tree's sets (editable installs)


def local_set_dirs() -> list[Path]:
    """Where local dictionary sets are looked for, in order: ``$FEATCIRCUITS_SAES``, the source tree."""
    env = os.environ.get(SAES_ENV)
    return [*([Path(env).expanduser()] if env else []), SOURCE_SAES]


def local_set_folder(name: str) -> Path | None:
    """The folder of the local set ``name`` (first of ``local_set_dirs``), or None."""
    for root in local_set_dirs():
        if (root / name).is_dir():
            return root / name
    return None


class Dictionary(nn.Module):
    """The interface every dictionary follows. Subclasses set ``d_in`` and ``d_sae``."""

    d_in: int
    d_sae: int
    source: str = ""

    @property
    def hook_name(self) -> str | None:
        """The TransformerLens hook the dictionary records having read (sae-lens metadata), or None."""
        return None

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class IdentityDictionary(Dictionary):
    """Neurons as features: ``f = x``, ``x_hat = f``, error term exactly zero."""

    def __init__(self, d: int):
        super().__init__()
        self.d_in = self.d_sae = int(d)
        self.source = "identity"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f


class SaeLensDictionary(Dictionary):
    """Any sae-lens SAE (standard, TopK, JumpReLU, gated...) behind the common interface."""

    def __init__(self, sae: Any, source: str):
        super().__init__()
        self.sae = sae
        self.d_in = int(sae.cfg.d_in)
        self.d_sae = int(sae.cfg.d_sae)
        self.source = source
        if getattr(sae, "hook_z_reshaping_mode", False):
            # sae-lens flattens [..., n_heads, d_head] inputs of hook_z SAEs itself; featcircuits
            # hands it the concatenated heads (o_proj's input) already flat, so reshaping stays off
            sae.turn_off_forward_pass_hook_z_reshaping()

    @property
    def hook_name(self) -> str | None:
        return getattr(getattr(self.sae.cfg, "metadata", None), "hook_name", None)

    def to(self, *args: Any, **kwargs: Any) -> "SaeLensDictionary":
        # sae-lens keeps its own device/dtype (cfg.dtype, used to cast inputs): move through its ``to``
        self.sae.to(*args, **kwargs)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x.to(self.sae.W_enc.dtype)).to(x.dtype)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f.to(self.sae.W_dec.dtype)).to(f.dtype)


class DictionaryLearningAE(Dictionary):
    """dictionary_learning's ``AutoEncoder`` (``ae.pt``): relu(encoder(x - bias)), decoder(f) + bias.

    Re-implemented in a few lines rather than depending on dictionary_learning, which pins
    an older torch/nnsight than this project resolves with.
    """

    def __init__(self, state: dict[str, torch.Tensor], source: str):
        super().__init__()
        need = {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}
        missing = need - set(state)
        if missing:
            raise UserError(f"{source}: not a dictionary_learning ae.pt (missing {', '.join(sorted(missing))})")
        self.W_enc = nn.Parameter(state["encoder.weight"].float(), requires_grad=False)  # [dict, d]
        self.b_enc = nn.Parameter(state["encoder.bias"].float(), requires_grad=False)
        self.W_dec = nn.Parameter(state["decoder.weight"].float(), requires_grad=False)  # [d, dict]
        self.b_dec = nn.Parameter(state["bias"].float(), requires_grad=False)
        self.d_sae, self.d_in = self.W_enc.shape
        self.source = source

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec.T + self.b_dec


@contextlib.contextmanager
def _shapes_from_the_local_cache() -> Iterator[None]:
    """sae-lens 6.54 reads the tensor shapes of Gemma Scope 2 files with HTTP range requests
    even when the file sits in the local Hugging Face cache, so an offline user with the files
    cached cannot load them (tests/test_hub_offline.py). While loading, read the header from
    the cached file when it is there, and fall back to sae-lens's own request otherwise."""
    from huggingface_hub import try_to_load_from_cache
    from safetensors import safe_open
    from sae_lens.loading import pretrained_sae_loaders as loaders

    original = getattr(loaders, "get_safetensors_tensor_shapes", None)
    if original is None:  # a sae-lens without the function: nothing to work around
        yield
        return

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        cached = try_to_load_from_cache(repo_id, filename)
        if not isinstance(cached, str):
            return original(repo_id, filename)
        with safe_open(cached, framework="pt") as fh:
            return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}

    loaders.get_safetensors_tensor_shapes = shapes
    try:
        yield
    finally:
        loaders.get_safetensors_tensor_shapes = original


def load_dictionary(source: str | Path, d_model: int | None = None) -> Dictionary:
    """Load one dictionary.

    ``source``: ``identity`` (needs ``d_model``), a folder with ``cfg.json`` (sae-lens), an
    ``ae.pt`` file (dictionary_learning), or ``saelens:RELEASE/SAE_ID`` (hub release).
    """
    source = str(source)
    if source == "identity":
        if d_model is None:
            raise UserError("an identity dictionary needs the site width")
        return IdentityDictionary(d_model)
    if source.startswith("saelens:"):
        release, _, sae_id = source[len("saelens:"):].partition("/")
        from sae_lens import SAE

        try:
            with _shapes_from_the_local_cache():
                sae = SAE.from_pretrained(release, sae_id, device="cpu")
        except Exception as exc:  # network errors, unknown ids: say which dictionary failed
            raise UserError(f"could not load sae-lens release {release!r} id {sae_id!r}: {exc}") from exc
        return SaeLensDictionary(sae, source)
    path = Path(source)
    if path.is_dir() and (path / "cfg.json").is_file():
        from sae_lens import SAE

        weights = path / "sae_weights.safetensors"
        if not weights.is_file():
            raise UserError(f"{path}: cfg.json found but sae_weights.safetensors is missing")
        try:
            sae = SAE.load_from_disk(path, device="cpu", dtype="float32")
        except Exception as exc:  # truncated or tampered safetensors, bad cfg
            raise UserError(f"{path}: could not load the sae-lens dictionary ({exc})") from exc
        return SaeLensDictionary(sae, str(path))
    if path.is_file() and path.suffix == ".pt":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{path}: could not read the state dict ({exc})") from exc
        return DictionaryLearningAE(state, str(path))
    raise UserError(
        f"no dictionary at {source!r}: give 'identity', a sae-lens folder (cfg.json + "
        "sae_weights.safetensors), an ae.pt file, or saelens:RELEASE/SAE_ID"
    )


@dataclass
class DictionarySet:
    """Site name -> dictionary, in the model's site order."""

    name: str
    dictionaries: dict[str, Dictionary]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, site: str) -> Dictionary:
        return self.dictionaries[site]

    def __contains__(self, site: str) -> bool:
        return site in self.dictionaries

    def widths(self) -> dict[str, int]:
        return {s: d.d_sae for s, d in self.dictionaries.items()}

    def z_sites(self) -> list[str]:
        """The sites whose dictionary reads hook_z (``Adapter.sites(z=...)`` places them)."""
        return z_sites(self.dictionaries)

    def to(self, device: "torch.device | str", dtype: torch.dtype) -> "DictionarySet":
        """Move every dictionary to ``device`` and ``dtype`` in place (returns self)."""
        for d in self.dictionaries.values():
            d.to(device=device, dtype=dtype)
        return self

    def digest(self) -> str:
        """A short hash of every dictionary's weights (for provenance in summary.json).

        Only what the dictionaries compute goes in (site, kind, hook, shapes, weights), never
        where they were loaded from: the same set named ``starter``, by its folder, or from
        another checkout has one digest, so a report checked against it still matches."""
        h = hashlib.sha256()
        for site, d in self.dictionaries.items():
            h.update(site.encode())
            for t in d.state_dict().values():
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            h.update(str((type(d).__name__, d.hook_name, d.d_in, d.d_sae)).encode())
        return h.hexdigest()[:16]


def z_sites(dictionaries: dict[str, Dictionary]) -> list[str]:
    """Names of the sites whose dictionary records reading hook_z."""
    return [s for s, d in dictionaries.items() if reads_for_hook(d.hook_name) == READS_Z]


def check_hook(site: Site, dictionary: Dictionary) -> None:
    """A hub SAE must read the activation of the site it is put at: its recorded hook (sae-lens
    metadata: a TransformerLens ``hook_name``, and for some releases the HF module it read)
    must name that site, else a registry entry would splice, say, a residual SAE into an MLP
    output without a word. Dictionaries that record no hook are not checked."""
    meta = getattr(getattr(getattr(dictionary, "sae", None), "cfg", None), "metadata", None)
    hook, hf_hook = getattr(meta, "hook_name", None), getattr(meta, "hf_hook_name", None)
    wrong = (hook is not None and hook not in transformer_lens_hooks(site)) or \
        (hf_hook is not None and hf_hook != f"{site.path}.{'input' if site.reads_input else 'output'}")
    if wrong:
        raise UserError(f"{dictionary.source} reads {hf_hook or hook}, not the site {site.name} "
                        f"({' or '.join(sorted(transformer_lens_hooks(site)))}); check the set's registry entry")


def check_width(site: Site, dictionary: Dictionary | int, adapter: Adapter) -> None:
    """A dictionary (or its ``d_in``) must read the site's width (``Adapter.site_width``); at an
    attention site the message says which of its two points (output, hook_z) has which width."""
    d_in, width = dictionary if isinstance(dictionary, int) else dictionary.d_in, adapter.site_width(site)
    if d_in == width:
        return
    hint, z = "", f"blocks.{site.layer}.attn.hook_z"
    if site.reads_input:
        hint = f"; it records hook {z} (the heads before o_proj, width {width}), not the attention output"
    elif site.kind == "attn" and d_in == adapter.z_width:
        hint = f"; {d_in} is hook_z's width: an SAE that reads it must record hook_name {z} in its metadata"
    raise UserError(f"dictionary for site {site.name}{' (hook_z)' if site.reads_input else ''} reads width "
                    f"{d_in} but the site has width {width}: this dictionary was trained for another model "
                    f"or site{hint}")


def _check_site_names(name: str, found: Iterable[str], adapter: Adapter) -> None:
    unknown = set(found) - {s.name for s in adapter.sites()}
    if unknown:
        raise UserError(f"dictionary set {name!r} names sites this model lacks: {', '.join(sorted(unknown))}")


def precheck_dictionary_set(spec: str | None, adapter: Adapter) -> None:
    """Check a folder set against the model's config before any weights load: site names and
    the ``d_in`` in each sae-lens ``cfg.json`` (``ae.pt`` files and hub sets are checked when
    loaded, :func:`load_dictionary_set`, since their widths are inside the weights)."""
    if spec in (None, "", "identity"):
        return
    reg = registry()
    if spec in reg:
        entry = reg[spec]
        folder = local_set_folder(entry["path"]) if entry.get("kind") == "local" else None
    else:
        folder = Path(spec) if Path(spec).is_dir() else None
    if folder is None:
        return  # a hub set, a missing folder or an unknown name: load_dictionary_set says which
    cfgs = {sub.name: sub / "cfg.json" for sub in sorted(folder.iterdir()) if (sub / "cfg.json").is_file()}
    _check_site_names(spec, cfgs, adapter)
    read: dict[str, dict] = {}
    for site, cfg in cfgs.items():
        try:
            read[site] = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # unreadable: load_dictionary reports it with its own message
    hooks = {s: (c.get("metadata") or {}).get("hook_name", c.get("hook_name")) for s, c in read.items()}
    sites = {s.name: s for s in adapter.sites([s for s, h in hooks.items() if reads_for_hook(h) == READS_Z])}
    for site, cfg in read.items():
        if isinstance(cfg.get("d_in"), int):
            check_width(sites[site], cfg["d_in"], adapter)


def identity_set(adapter: Adapter) -> DictionarySet:
    return DictionarySet(
        "identity", {s.name: IdentityDictionary(adapter.d_model) for s in adapter.sites()}, {"kind": "identity"}
    )


def registry() -> dict[str, Any]:
    """The named dictionary sets (package data)."""
    return json.loads(REGISTRY.read_text())


def load_dictionary_set(spec: str | None, adapter: Adapter, model_spec: str = "") -> DictionarySet:
    """Resolve ``--saes``: ``identity``, a registered set name, or a folder of per-site folders.

    A folder set holds one sae-lens folder (or ``ae.pt``) per site, named by site
    (``resid_3/``, ``mlp_3/ae.pt``...). Sites without a dictionary get the identity
    dictionary; the set's ``meta["identity_sites"]`` lists them.
    """
    if spec in (None, "", "identity"):
        return identity_set(adapter)
    reg = registry()
    if spec in reg:
        entry = reg[spec]
        if entry.get("kind") == "local":
            folder = local_set_folder(entry["path"])
            if folder is None:
                where = " or ".join(str(d) for d in local_set_dirs())
                raise UserError(f"dictionary set {spec!r} is registered as the local folder {entry['path']!r}, "
                                f"which is not in {where}; set {SAES_ENV} to the folder that holds it")
            return _folder_set(spec, folder, adapter, entry)
        if entry.get("kind") == "saelens":
            return _hub_set(spec, entry, adapter)
        raise UserError(f"registry entry {spec!r} has unknown kind {entry.get('kind')!r}")
    path = Path(spec)
    if path.is_dir():
        return _folder_set(path.name, path, adapter, {})
    names = ", ".join(["identity", *sorted(reg)])
    raise UserError(f"unknown dictionary set {spec!r}: give a folder of per-site dictionaries or one of {names}")


def _finish(name: str, found: dict[str, Dictionary], adapter: Adapter, meta: dict) -> DictionarySet:
    if not found:
        raise UserError(f"dictionary set {name!r} has no dictionary for any site of this model")
    _check_site_names(name, found, adapter)
    out: dict[str, Dictionary] = {}
    identity_sites = []
    for site in adapter.sites(z_sites(found)):
        if site.name in found:
            check_width(site, found[site.name], adapter)
            out[site.name] = found[site.name]
        else:
            out[site.name] = IdentityDictionary(adapter.d_model)
            identity_sites.append(site.name)
    return DictionarySet(name, out, {**meta, "identity_sites": identity_sites})


def _folder_set(name: str, folder: Path, adapter: Adapter, entry: dict) -> DictionarySet:
    found: dict[str, Dictionary] = {}
    for sub in sorted(folder.iterdir()):
        if sub.is_dir() and (sub / "cfg.json").is_file():
            found[sub.name] = load_dictionary(sub)
        elif sub.is_dir() and (sub / "ae.pt").is_file():
            found[sub.name] = load_dictionary(sub / "ae.pt")
    meta = {"kind": "local", "path": str(folder), **{k: v for k, v in entry.items() if k != "path"}}
    meta_file = folder / "set.json"
    if meta_file.is_file():
        meta["set"] = json.loads(meta_file.read_text())
    return _finish(name, found, adapter, meta)


def _hub_set(name: str, entry: dict, adapter: Adapter) -> DictionarySet:
    """A set of sae-lens hub releases described by per-kind templates, e.g.
    ``{"resid": {"release": "...", "sae_id": "blocks.{layer}.hook_resid_post"}}``."""
    found: dict[str, Dictionary] = {}
    for site in adapter.sites():
        tpl = entry["sites"].get(site.kind)
        if tpl is None:
            continue
        sae_id = tpl["sae_id"].format(layer=site.layer)
        found[site.name] = load_dictionary(f"saelens:{tpl['release']}/{sae_id}")
    for site in adapter.sites(z_sites(found)):  # each at the point its recorded hook names
        if site.name in found:
            check_hook(site, found[site.name])
    return _finish(name, found, adapter, {"kind": "saelens", "model": entry.get("model")})
