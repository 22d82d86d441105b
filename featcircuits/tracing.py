"""The model traced with nnsight, dictionaries spliced in at every site.

At a site with activation ``x``: ``f = encode(x)``, ``x_hat = decode(f)``, ``err = x - x_hat``
and the model continues with ``x_hat + err``. A site is a module's output, or for attention
sites whose dictionary reads hook_z the first input of the output projection (the adapter
says which, ``Site.reads``): the splice replaces that input and ``o_proj`` runs on it.
``SplicedModel.run`` visits the sites in forward order inside one nnsight trace and lets a
*site hook* read or replace each site's value; every estimator, edge computation and ablation
in featcircuits is such a hook.
Logits are computed at the last position only (``logits_to_keep=1``): the offline Gemma
has a 262k vocabulary and the metric reads only that position.
"""

from __future__ import annotations

from typing import Callable, Iterable

import nnsight
import torch

from .adapters import Site, resolve
from .dictionaries import Dictionary, DictionarySet, check_width, identity_set
from .errors import UserError
from .models import LoadedModel
from .nodes import Act

# hook(site, x) -> replacement for x, or None to leave the site as it is
SiteHook = Callable[[Site, torch.Tensor], "torch.Tensor | None"]


class NonFiniteError(UserError):
    """NaN or inf in an activation or the metric: the run stops, naming site and example."""


def check_finite(where: str, x: torch.Tensor) -> None:
    """Raise ``NonFiniteError`` naming ``where`` and the first bad example (cheap: one reduction)."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1) if x.ndim > 1 else ~torch.isfinite(x)
        example = int(torch.nonzero(bad).flatten()[0]) if bad.any() else -1
        raise NonFiniteError(f"non-finite values (NaN or inf) at {where}, example {example}: stopping; "
                             "check the model's dtype and weights and the dictionaries")


def split(d: Dictionary, x: torch.Tensor) -> Act:
    """Encode a site activation into features and the exact error term (no gradients)."""
    with torch.no_grad():
        f = d.encode(x)
        err = x - d.decode(f)
    return Act(f, err)


def join(d: Dictionary, v: Act) -> torch.Tensor:
    """The site value the model continues with: ``decode(f) + err``."""
    return d.decode(v.f) + v.err


def grad_leaves(d: Dictionary, x: torch.Tensor) -> tuple[torch.Tensor, Act]:
    """Splice with features and error as gradient leaves, leaving the value exactly ``x``.

    Returns the site's new value and the leaves. The value is ``x`` plus exact zeros, so
    splicing changes no output; gradients reach ``f`` (through the decoder), ``err``
    (identity) and upstream (straight through: the encoder is not differentiated).
    """
    with torch.no_grad():
        f0 = d.encode(x)
    f = f0.detach().requires_grad_(True)
    x_hat = d.decode(f)
    err = (x.detach() - x_hat.detach()).requires_grad_(True)
    out = x + (x_hat - x_hat.detach()) + (err - err.detach())
    return out, Act(f, err)


class SplicedModel:
    """A ``LoadedModel`` with a ``DictionarySet`` spliced in at every site."""

    def __init__(self, model: LoadedModel, dictionaries: DictionarySet | None = None):
        self.model = model
        self.adapter = model.adapter
        self.dictionaries = dictionaries if dictionaries is not None else identity_set(model.adapter)
        # dictionaries follow the model: same device, same dtype (the splice adds them to its values)
        self.dictionaries.to(model.device, model.dtype)
        # attention sites whose dictionary reads hook_z sit at o_proj's input (same names)
        self.sites: list[Site] = self.adapter.sites(self.dictionaries.z_sites())
        self._by_name = {s.name: s for s in self.sites}
        missing = [s.name for s in self.sites if s.name not in self.dictionaries]
        if missing:
            raise UserError(f"dictionary set {self.dictionaries.name!r} lacks sites {', '.join(missing[:5])}")
        for s in self.sites:  # a set built by hand is checked too: a wrong width must not splice
            check_width(s, self.dictionaries[s.name], self.adapter)
        if len(set((model.device_map or {}).values())) > 1:  # layers spread over devices: each site's own
            for s in self.sites:
                self.dictionary(s).to(device=model.module_device(s.path), dtype=model.dtype)
        self.n_forward = 0  # passes counted for provenance and benchmarks
        self.n_backward = 0
        self.rows_forward = 0  # example rows through the model (a stacked batch counts every row)
        self.rows_backward = 0
        self._grad_rows = 0

    def grad(self, outputs: torch.Tensor, inputs: list[torch.Tensor], **kwargs) -> tuple:
        """``torch.autograd.grad`` counted as one backward pass (``n_backward``, also when it
        batches many vector-Jacobian products); ``rows_backward`` adds the example rows of the
        last forward that built a graph."""
        self.n_backward += 1
        self.rows_backward += self._grad_rows
        return torch.autograd.grad(outputs, inputs, **kwargs)

    def counters(self) -> tuple[int, int, int, int]:
        """(forward passes, backward passes, forward rows, backward rows) so far."""
        return self.n_forward, self.n_backward, self.rows_forward, self.rows_backward

    def site(self, name: str) -> Site:
        """The site named ``name`` as this model reads it (hook_z or output)."""
        if name not in self._by_name:
            return self.adapter.site(name)  # raises the UserError naming the valid sites
        return self._by_name[name]

    def dictionary(self, site: str | Site) -> Dictionary:
        return self.dictionaries[site if isinstance(site, str) else site.name]

    def run(self, inputs: dict[str, torch.Tensor], hook: SiteHook | None = None,
            sites: Iterable[Site] | None = None, stop: bool = False,
            positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """One forward pass; returns the last-position logits [b, vocab] (with autograd graph).

        ``hook`` is called at each site in ``sites`` (default: all) in forward order. With
        ``stop`` the model stops right after the last visited site and None is returned
        (readers of site values need no later layer, final norm or unembedding). With
        ``positions`` (1-D sequence indices) the logits of those positions come back,
        [b, len(positions), vocab], and only they pass through the unembedding.
        """
        visit = list(self.sites if sites is None else sites)
        lm = self.model.lm
        device = self.model.device
        inputs = {k: v.to(device) for k, v in inputs.items()}  # batches are built on the CPU
        rows = int(next(iter(inputs.values())).shape[0])
        self.n_forward += 1
        self.rows_forward += rows
        if torch.is_grad_enabled():
            self._grad_rows = rows
        logits = None
        keep = 1 if positions is None else positions.to(device)
        with lm.trace(dict(inputs), logits_to_keep=keep) as tracer:
            if hook is not None:
                for site in visit:
                    env = resolve(lm, site.path)
                    if site.reads_input:  # hook_z: the output projection's input
                        new = hook(site, env.input)
                        if new is not None:
                            env.input = new
                        continue
                    out = env.output
                    x = out[0] if site.tuple_output else out
                    new = hook(site, x)
                    if new is not None:
                        env.output = (new, *out[1:]) if site.tuple_output else new
            if stop and hook is not None and visit:
                tracer.stop()
            else:
                logits = nnsight.save(lm.output.logits[:, -1, :] if positions is None else lm.output.logits)
        return logits

    def cache(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Act]]:
        """Forward pass without gradients; returns logits and each site's features and error."""
        values: dict[str, Act] = {}

        def record(site: Site, x: torch.Tensor) -> None:
            check_finite(f"site {site.name}", x)
            values[site.name] = split(self.dictionary(site), x)
            return None

        with torch.no_grad():
            logits = self.run(inputs, record)
        return logits, values

    def run_with_leaves(self, inputs: dict[str, torch.Tensor],
                        sites: Iterable[Site] | None = None) -> tuple[torch.Tensor, dict[str, Act]]:
        """Forward pass with every site's features and error as gradient leaves."""
        leaves: dict[str, Act] = {}

        def splice(site: Site, x: torch.Tensor) -> torch.Tensor:
            check_finite(f"site {site.name}", x)
            out, leaves[site.name] = grad_leaves(self.dictionary(site), x)
            return out

        logits = self.run(inputs, splice, sites)
        return logits, leaves

    def run_patched(self, inputs: dict[str, torch.Tensor], values: dict[str, Act]) -> torch.Tensor:
        """Forward pass in which the named sites take the given features and errors."""
        def patch(site: Site, x: torch.Tensor) -> torch.Tensor | None:
            v = values.get(site.name)
            return None if v is None else join(self.dictionary(site), v).to(x.dtype)

        return self.run(inputs, patch, [s for s in self.sites if s.name in values])
