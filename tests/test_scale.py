"""Thousands of pairs: the edge stage reuses node-stage gradients only within a memory budget,
and recomputing the rest gives the same circuit."""

import torch

import featcircuits as fc
from featcircuits.testing import tiny_model


def test_gradient_budget_recomputes_and_gives_the_same_circuit():
    model = tiny_model("gemma3")
    sm = fc.SplicedModel(model)
    batch, _ = fc.tokenize_pairs(fc.make_pairs("sva-nounpp", 12), model.tokenizer)
    kw = dict(thresholds=fc.Thresholds(top_k=15), batch_size=4, progress=False)
    f0 = sm.n_forward
    kept = fc.discover_circuit(sm, batch, "relp", keep_gradients_bytes=2**40, **kw)
    f_kept = sm.n_forward - f0
    f0 = sm.n_forward
    none = fc.discover_circuit(sm, batch, "relp", keep_gradients_bytes=0, **kw)
    f_none = sm.n_forward - f0
    assert kept.provenance["gradients_kept_chunks"] == 3 and none.provenance["gradients_kept_chunks"] == 0
    assert f_none == f_kept + 2 * 3  # each of the 3 chunks recomputed: counterfactual + clean forward
    assert set(kept.graph.nodes) == set(none.graph.nodes)
    a = {(u, v): w for u, v, w in kept.graph.edges(data="weight")}
    b = {(u, v): w for u, v, w in none.graph.edges(data="weight")}
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 for k in a)
    for s, v in kept.effects.items():
        assert torch.equal(v.f, none.effects[s].f) and torch.equal(v.err, none.effects[s].err)
