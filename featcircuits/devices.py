"""Where and in what precision the model runs: ``--device`` and ``--dtype`` resolved once.

``resolve_device("auto")`` picks CUDA, then MPS, then the CPU; an explicit device that torch
cannot see is a ``UserError`` (one line), never a silent fall-back to the CPU. Effects, edge
sums and metrics are accumulated in ``ACCUMULATE`` (float32) whatever the model's dtype:
bfloat16 has 8 bits of mantissa, so a sum over thousands of pairs kept in it would lose the
small effects entirely.
"""

from __future__ import annotations

import torch

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ACCUMULATE = torch.float32  # the dtype every running sum (effects, edges, metrics) is kept in


def resolve_device(spec: "str | torch.device | None" = "auto") -> torch.device:
    """``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a checked ``torch.device``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec in ("auto", "cuda"):
        from .distributed import local_device

        spec = local_device() or spec  # under torchrun each rank takes its own GPU
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}; choose from {', '.join(DEVICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} but torch sees no CUDA device "
                            f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'})")
        count = torch.cuda.device_count()
        index = 0 if device.index is None else device.index
        if index >= count:
            raise UserError(f"--device {spec} but torch sees {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise UserError(f"--device {spec} but torch sees no MPS device (Apple silicon only)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {spec!r}; choose from {', '.join(DEVICES)}")
    return device


DEVICE_MAPS = ("auto",)


def check_device_map(device_map: "str | dict | None", device: "str | torch.device | None") -> "str | dict | None":
    """``--device-map``: accelerate's placement of the model's layers over the devices it sees
    (``auto``; in Python also an explicit ``{module: device}`` dict), or None. Refused, one line
    each: an unknown value, an explicit ``device`` beside it (the map decides where every layer
    goes), torchrun (each rank takes one device; a map spreads one model over all of them) and
    a missing accelerate."""
    if device_map is None:
        return None
    if isinstance(device_map, str):
        device_map = device_map.strip().lower()
        if device_map not in DEVICE_MAPS:
            raise UserError(f"unknown --device-map {device_map!r}; choose from {', '.join(DEVICE_MAPS)}")
    elif not isinstance(device_map, dict):
        raise UserError(f"device_map must be {' or '.join(map(repr, DEVICE_MAPS))} or a dict, got {device_map!r}")
    if device is not None and str(device).strip().lower() != "auto":
        raise UserError(f"--device-map {device_map if isinstance(device_map, str) else '{...}'} places the model's "
                        f"layers itself: drop --device {device} (or drop --device-map)")
    from .distributed import requested

    if requested():
        raise UserError("--device-map spreads one model over every device, torchrun runs one model per device: "
                        "use one of them")
    try:
        import accelerate  # noqa: F401  (transformers needs it for device_map)
    except ImportError:
        raise UserError("--device-map needs accelerate: pip install 'accelerate>=1.15'") from None
    return device_map


def resolve_dtype(spec: "str | torch.dtype | None" = "float32") -> torch.dtype:
    """``float32`` | ``bfloat16`` | ``float16`` (or a ``torch.dtype``) as a ``torch.dtype``."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise UserError(f"unsupported dtype {spec}; choose from {', '.join(DTYPES)}")
        return spec
    name = (spec or "float32").strip().lower()
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(name, name)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {spec!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``bfloat16`` for ``torch.bfloat16`` (the name summary.json and the flags use)."""
    return str(dtype).removeprefix("torch.")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
