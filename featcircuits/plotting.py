"""Shared plotting conventions: one colour per method across every figure of the project,
and a helper that saves a figure as PNG and SVG atomically."""

from __future__ import annotations

from pathlib import Path

METHOD_COLORS = {
    "exact": "#222222",
    "atp": "#E69F00",      # orange
    "relp": "#0072B2",     # blue
    "relp+ah": "#56B4E9",  # light blue
    "relp:ln+identity+half": "#56B4E9",  # the RelP authors' rules: light blue too (never shown with relp+ah)
    "ig": "#009E73",       # green
    "random": "#999999",   # grey
}
METHOD_LABELS = {"exact": "exact patching", "atp": "AtP", "relp": "RelP", "relp+ah": "RelP (+AH rule)",
                 "ig": "IG", "random": "random"}


# RelP under other rule sets (``relp:<rules>``): further colours, fixed per rule set
_VARIANT_COLORS = ("#CC79A7", "#D55E00", "#7B3294", "#882255", "#E7298A")  # no greens: IG is green


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    # a stable pick (not hash(), which changes between processes)
    return _VARIANT_COLORS[sum(method.encode()) % len(_VARIANT_COLORS)]


def method_label(method: str) -> str:
    """``AtP``, ``RelP``, ``RelP [ln,identity,half-qk]`` for ``relp:ln+identity+half-qk``, ...;
    the RelP authors' set is ``RelP [paper: ln,identity,half]``."""
    if method == "relp:ln+identity+half":
        return "RelP [paper: ln,identity,half]"
    if method == "relp:secant+mid+mid-softmax+norm-secant":
        return "RelP [two-point]"
    if method.startswith("relp:"):
        return f"RelP [{method[len('relp:'):].replace('+', ',')}]"
    return METHOD_LABELS.get(method, method)


def save_figure(fig, path_stem: str | Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.svg`` (temp file + rename, never half-written)."""
    import os

    out = []
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        final = stem.with_suffix(f".{fmt}")
        tmp = final.with_name(f".{final.name}.tmp")
        fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
        os.replace(tmp, final)
        out.append(final)
    return out
