"""Edges: direct-path attributions into selected nodes; batched path equals the reference."""

import pytest
import torch

from featcircuits.gradient_store import GradientStore
from featcircuits.attribution import node_effects
from featcircuits.dictionaries import load_dictionary_set
from featcircuits.edges import edge_effects
from featcircuits.graph import Thresholds, select_nodes
from featcircuits.tasks import make_pairs, tokenize_pairs
from featcircuits.testing import random_saelens_set, tiny_model
from featcircuits.tracing import SplicedModel


@pytest.fixture(scope="module", params=["gemma3", "gpt_neox"])
def spliced(request, tmp_path_factory):
    model = tiny_model(request.param, scale=0.1)
    folder = tmp_path_factory.mktemp(f"saes_{request.param}")
    random_saelens_set(model, folder, width=16)
    sm = SplicedModel(model, load_dictionary_set(str(folder), model.adapter))
    batch, _ = tokenize_pairs(make_pairs("ioi", 4), model.tokenizer)
    return sm, batch


def test_direct_upstream_layouts():
    seq = tiny_model("gemma3").adapter
    par = tiny_model("gpt_neox").adapter
    assert seq.upstream("attn_0") == ["embed"]
    assert seq.upstream("mlp_1") == ["resid_0", "attn_1"]
    assert par.upstream("mlp_1") == ["resid_0"]
    assert seq.upstream("resid_1") == ["resid_0", "attn_1", "mlp_1"]
    assert seq.upstream("embed") == []


@pytest.mark.parametrize("method", ["atp", "relp"])
@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_edges_into_resid_sum_to_node_effect(spliced, method, aggregation):
    sm, batch = spliced
    mean = node_effects(sm, batch, method, progress=False).mean(aggregation)
    masks = select_nodes(mean, Thresholds(node=0.0))
    ee = edge_effects(sm, batch, masks, method, aggregation=aggregation, progress=False)
    for layer in range(sm.adapter.n_layers):
        site = f"resid_{layer}"
        into = sum(float(wf.sum() + we.sum()) for (u, d), (wf, we) in ee.weights.items() if d == site)
        total = float(mean[site].f[masks[site].f].sum() + mean[site].err[masks[site].err].sum())
        assert into == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize("aggregation", ["sum", "none"])
def test_batched_edges_equal_one_backward_per_node(spliced, aggregation):
    sm, batch = spliced
    mean = node_effects(sm, batch, "relp", progress=False).mean(aggregation)
    masks = select_nodes(mean, Thresholds(top_k=12))
    fast = edge_effects(sm, batch, masks, "relp", aggregation=aggregation, progress=False)
    slow = edge_effects(sm, batch, masks, "relp", aggregation=aggregation, batched=False, progress=False)
    assert fast.weights.keys() == slow.weights.keys()
    for key in fast.weights:
        for a, b in zip(fast.weights[key], slow.weights[key]):
            assert torch.allclose(a, b, atol=1e-6)
    assert fast.passes["backward"] < slow.passes["backward"]


def test_ig_edges_run(spliced):
    sm, batch = spliced
    mean = node_effects(sm, batch, "ig", steps=3, progress=False).mean("sum")
    masks = select_nodes(mean, Thresholds(top_k=6))
    ee = edge_effects(sm, batch, masks, "ig", steps=3, progress=False)
    assert ee.edge_list(masks) is not None and ee.weights


def test_reusing_node_gradients_gives_same_edges(spliced):
    sm, batch = spliced
    gradients = GradientStore()
    effects = node_effects(sm, batch, "relp", batch_size=2, gradients=gradients, progress=False)
    masks = select_nodes(effects.mean("sum"), Thresholds(top_k=8))
    fresh = edge_effects(sm, batch, masks, "relp", batch_size=2, progress=False)
    before = sm.n_backward
    reused = edge_effects(sm, batch, masks, "relp", batch_size=2, gradients=gradients, progress=False)
    for key in fresh.weights:
        assert torch.allclose(fresh.weights[key].f, reused.weights[key].f, atol=1e-6)
    # reuse saves the metric backward of every chunk
    assert reused.passes["backward"] == fresh.passes["backward"] - len(batch.chunks(2))


def test_two_point_edges_sum_to_node_effects_and_reuse_the_tape(spliced):
    """Edges under the two-point rules replay the counterfactual tape of their chunk: edges into
    a resid site still sum to its node effect, and reusing the node stage's gradients (with
    their tapes) gives the edges a fresh run computes."""
    sm, batch = spliced
    gradients = GradientStore()
    effects = node_effects(sm, batch, "relp", rules="two-point", batch_size=2, gradients=gradients,
                           progress=False)
    assert all(sg.reference is not None and len(sg.reference) for sg in map(gradients.get, range(len(gradients))))
    mean = effects.mean("sum")
    masks = select_nodes(mean, Thresholds(node=0.0))
    fresh = edge_effects(sm, batch, masks, "relp", rules="two-point", batch_size=2, progress=False)
    reused = edge_effects(sm, batch, masks, "relp", rules="two-point", batch_size=2,
                          gradients=gradients, progress=False)
    for key in fresh.weights:
        assert torch.allclose(fresh.weights[key].f, reused.weights[key].f, atol=1e-6)
    for layer in range(sm.adapter.n_layers):
        site = f"resid_{layer}"
        into = sum(float(wf.sum() + we.sum()) for (u, d), (wf, we) in fresh.weights.items() if d == site)
        total = float(mean[site].f[masks[site].f].sum() + mean[site].err[masks[site].err].sum())
        assert into == pytest.approx(total, abs=1e-4)
