"""The node space: flatten/unflatten, locate, ids and selections agree with each other."""

import pytest
import torch

from featcircuits.nodes import Act, NodeSpace, count_nodes, node_id, parse_node_id


def _effects(per_position: bool) -> dict[str, Act]:
    gen = torch.Generator().manual_seed(0)
    shape_f, shape_e = ((3, 5), (3,)) if per_position else ((5,), ())
    return {s: Act(torch.randn(shape_f, generator=gen), torch.randn(shape_e, generator=gen))
            for s in ("embed", "attn_0", "resid_0")}


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
@pytest.mark.parametrize("per_position", [False, True])
def test_flatten_locate_unflatten_round_trip(layout, per_position):
    eff = _effects(per_position)
    space = NodeSpace.of(eff, layout)
    flat = space.flatten(eff)
    assert flat.numel() == space.size == sum(v.f.numel() + v.err.numel() for v in eff.values())
    for i in range(space.size):
        site, index, position = space.locate(i)
        assert eff[site].value(index, position) == float(flat[i])
    back = space.unflatten(flat)
    assert all(torch.equal(back[s].f, eff[s].f) and torch.equal(back[s].err, eff[s].err) for s in eff)


@pytest.mark.parametrize("per_position", [False, True])
def test_selections_and_from_nodes(per_position):
    eff = _effects(per_position)
    space = NodeSpace.of(eff)
    score = space.flatten(eff).abs()
    top = space.unflatten(NodeSpace.top_k(score, 4))
    assert count_nodes(top) == 4
    chosen = [(s, i, t) for s, m in top.items() for i, t in m.nodes()]
    assert min(abs(eff[s].value(i, t)) for s, i, t in chosen) >= float(score.topk(4).values[-1])
    again = space.from_nodes(chosen)
    assert all(torch.equal(again[s].f, top[s].f) and torch.equal(again[s].err, top[s].err) for s in eff)
    share = NodeSpace.share(score, 0.5)
    assert float(score[share].sum()) >= 0.5 * float(score.sum())
    drawn = NodeSpace.random(score, 6, torch.Generator().manual_seed(1))
    assert int(drawn.sum()) == 6


def test_node_ids_round_trip():
    for site, index, position in (("resid_5", 1234, -1), ("resid_5", -1, -1), ("resid_5", 1234, 7), ("embed", -1, 2)):
        nid = node_id(site, index, position)
        assert parse_node_id(nid) == (site, index, position)
    assert node_id("resid_5", -1) == "resid_5/err" and node_id("resid_5", 3, 7) == "resid_5/3@7"


def test_act_arithmetic_and_effect():
    a = Act(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 1.0]]))
    g = Act(torch.tensor([3.0, -1.0]), torch.tensor([[2.0, 0.5]]))
    e = (a - a * 0.5).effect(g)  # features elementwise, the error node a dot product
    assert torch.equal(e.f, torch.tensor([1.5, -1.0])) and torch.equal(e.err, torch.tensor([1.25]))
    assert torch.equal((~Act(torch.tensor([True, False]), torch.tensor(True))).f, torch.tensor([False, True]))
