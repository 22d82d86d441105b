"""Thousands of pairs: the edge stage reuses the node stage's gradients, in memory within a
budget and through a private folder on disk past it; spilled or recomputed, the circuit is
the same."""


import pytest
import torch

import featcircuits as fc
from featcircuits.gradient_store import GradientStore
from featcircuits.testing import tiny_model


def _same_circuit(a: fc.Circuit, b: fc.Circuit, tol: float = 1e-6) -> None:
    assert set(a.graph.nodes) == set(b.graph.nodes)
    wa = {(u, v): w for u, v, w in a.graph.edges(data="weight")}
    wb = {(u, v): w for u, v, w in b.graph.edges(data="weight")}
    assert wa.keys() == wb.keys() and all(abs(wa[k] - wb[k]) <= tol for k in wa)
    for s, v in a.effects.items():
        assert torch.equal(v.f, b.effects[s].f) and torch.equal(v.err, b.effects[s].err)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gemma3")
    sm = fc.SplicedModel(model)
    batch, _ = fc.tokenize_pairs(fc.make_pairs("sva-nounpp", 12), model.tokenizer)
    return sm, batch, dict(thresholds=fc.Thresholds(top_k=15), batch_size=4, progress=False)


def _run(sm, batch, **kw):
    f0 = sm.n_forward
    c = fc.discover_circuit(sm, batch, "relp", **kw)
    return c, sm.n_forward - f0


def test_past_the_budget_gradients_spill_to_disk_and_nothing_is_recomputed(setup, tmp_path):
    sm, batch, kw = setup
    kept, f_kept = _run(sm, batch, keep_gradients_bytes=2**40, **kw)
    spilled, f_spilled = _run(sm, batch, keep_gradients_bytes=0, checkpoint_dir=tmp_path / "ck", **kw)
    assert kept.provenance["gradients_chunks"] == {"memory": 3, "disk": 0, "recompute": 0}
    assert spilled.provenance["gradients_chunks"] == {"memory": 0, "disk": 3, "recompute": 0}
    assert f_spilled == f_kept  # read back, not recomputed
    _same_circuit(kept, spilled, tol=0.0)
    # the private spill folder (made beside the checkpoint) is gone once the call returns
    assert not list((tmp_path / "ck").glob("featcircuits-gradients-*"))


def test_without_spilling_chunks_past_the_budget_are_recomputed_to_the_same_circuit(setup):
    sm, batch, kw = setup
    kept, f_kept = _run(sm, batch, keep_gradients_bytes=2**40, **kw)
    none, f_none = _run(sm, batch, keep_gradients_bytes=0, spill_gradients=False, **kw)
    assert none.provenance["gradients_chunks"] == {"memory": 0, "disk": 0, "recompute": 3}
    assert f_none == f_kept + 2 * 3  # each of the 3 chunks recomputed: counterfactual + clean forward
    _same_circuit(kept, none)


def test_store_keeps_within_memory_then_disk_budget_and_deletes_its_folder(setup, tmp_path):
    sm, batch, _ = setup
    from featcircuits.attribution import site_gradients

    sg = site_gradients(sm, batch.slice(0, 4), "relp", sm.sites)
    size = sg.nbytes()
    store = GradientStore(keep_bytes=size, spill_dir=tmp_path, disk_bytes=size)
    store.reset(3)
    for i in range(3):
        store.put(i, sg)
    # one chunk fits the memory budget, one the disk budget, the third is left to recompute
    assert store.counts() == {"memory": 1, "disk": 1, "recompute": 1}
    folder = store.folder
    assert folder is not None and folder.parent == tmp_path and len(list(folder.iterdir())) == 1
    back = store.get(1)
    assert store.get(2) is None
    for site, v in sg.grads.items():
        assert torch.equal(back.grads[site].f, v.f) and torch.equal(back.grads[site].err, v.err)
    store.close()
    assert not folder.exists()
