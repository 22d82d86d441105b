"""Reliability: resume after a kill equals an uninterrupted run; same seed, same graph."""

import networkx as nx
import pytest
import torch

from featcircuits.attribution import node_effects
from featcircuits.checkpoint import Checkpoint
from featcircuits.discover import discover_circuit
from featcircuits.errors import UserError
from featcircuits.graph import Thresholds
from featcircuits.tasks import make_pairs, tokenize_pairs
from featcircuits.testing import tiny_model
from featcircuits.tracing import SplicedModel


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gemma3", scale=0.1)
    batch, _ = tokenize_pairs(make_pairs("sva-nounpp", 8), model.tokenizer)
    return SplicedModel(model), batch


class Killed(Exception):
    pass


def _kill_after(monkeypatch, n_saves):
    real = Checkpoint.save
    calls = {"n": 0}

    def save(self, done, state):
        real(self, done, state)  # the checkpoint is on disk, then the process "dies"
        calls["n"] += 1
        if calls["n"] == n_saves:
            raise Killed

    monkeypatch.setattr(Checkpoint, "save", save)


def test_node_effects_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    sm, batch = setup
    full = node_effects(sm, batch, "relp", batch_size=2, progress=False)
    config = {"run": 1}
    _kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        node_effects(sm, batch, "relp", batch_size=2, progress=False, checkpoint=Checkpoint(tmp_path, "n", config))
    monkeypatch.undo()
    ck = Checkpoint(tmp_path, "n", config, resume=True)
    assert ck.load()[0] == 2
    resumed = node_effects(sm, batch, "relp", batch_size=2, progress=False, checkpoint=ck)
    for s in full.effects:
        assert torch.equal(full.effects[s].f, resumed.effects[s].f)
        assert torch.equal(full.effects[s].err, resumed.effects[s].err)
    assert full.metric_clean == resumed.metric_clean


def test_discover_resume_equals_uninterrupted(setup, tmp_path, monkeypatch):
    sm, batch = setup
    kw = dict(thresholds=Thresholds(top_k=10), batch_size=2, progress=False)
    full = discover_circuit(sm, batch, "relp", **kw)
    _kill_after(monkeypatch, 6)  # 4 node chunks, then 2 edge chunks
    f0, b0 = sm.n_forward, sm.n_backward
    with pytest.raises(Killed):
        discover_circuit(sm, batch, "relp", checkpoint_dir=tmp_path, **kw)
    monkeypatch.undo()
    resumed = discover_circuit(sm, batch, "relp", checkpoint_dir=tmp_path, resume=True, **kw)
    both = {"forward": sm.n_forward - f0, "backward": sm.n_backward - b0}
    assert nx.utils.graphs_equal(full.graph, resumed.graph)
    # the provenance counts the passes of the checkpointed part and of the resumed part
    # (more than an uninterrupted run: the metric's gradients of restored chunks are recomputed for the edges)
    assert resumed.provenance["passes"] == both
    assert both["backward"] >= full.provenance["passes"]["backward"] > 0
    assert not (tmp_path / ".checkpoint" / "nodes-relp.pt").exists()  # cleared when done


def test_resume_with_other_settings_is_refused(setup, tmp_path):
    Checkpoint(tmp_path, "n", {"a": 1, "method": "ig", "same": [1, 2]}).save(1, {"x": torch.zeros(1)})
    with pytest.raises(UserError, match="other settings") as err:
        Checkpoint(tmp_path, "n", {"a": 2, "method": "ig", "same": [1, 2]}).load()
    assert "a: 1 then, 2 now" in str(err.value) and "method" not in str(err.value)  # names what differs
    (tmp_path / ".checkpoint" / "n.pt").write_bytes(b"corrupt")
    with pytest.raises(UserError, match="unreadable"):
        Checkpoint(tmp_path, "n", {"a": 1}).load()


def test_same_arguments_same_graph(setup):
    sm, batch = setup
    a = discover_circuit(sm, batch, "relp", thresholds=Thresholds(top_k=12), progress=False)
    b = discover_circuit(sm, batch, "relp", thresholds=Thresholds(top_k=12), progress=False)
    assert nx.utils.graphs_equal(a.graph, b.graph)
    assert dict(a.graph.nodes(data=True)) == dict(b.graph.nodes(data=True))
    assert [tuple(e) for e in a.graph.edges(data="weight")] == [tuple(e) for e in b.graph.edges(data="weight")]


# saves in order: relp nodes 2, atp nodes 2, then ablations relp 2, atp 2, random 2
@pytest.mark.parametrize("kill_after", [3, 7])  # inside atp's node effects; inside atp's ablations
def test_curves_resume_equals_uninterrupted(setup, tmp_path, monkeypatch, kill_after):
    from featcircuits.evaluation import run_curves

    sm, _ = setup
    kw = dict(task="sva-nounpp", n=8, n_eval=8, seed=0, methods=["relp", "atp", "random"], points=3,
              batch_size=4, stack=2, random_draws=2, progress=False)
    full = run_curves(sm.model, sm.dictionaries, out=tmp_path / "ref", **kw)
    _kill_after(monkeypatch, kill_after)
    with pytest.raises(Killed):
        run_curves(sm.model, sm.dictionaries, out=tmp_path / "run", **kw)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "curves.json").exists()
    from featcircuits import attribution

    real, calls = attribution.site_gradients, []
    monkeypatch.setattr(attribution, "site_gradients", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_curves(sm.model, sm.dictionaries, out=tmp_path / "run", resume=True, **kw)
    monkeypatch.undo()
    assert resumed["methods"] == full["methods"]
    assert (resumed["F_M"], resumed["F_empty"]) == (full["F_M"], full["F_empty"])
    assert not (tmp_path / "run" / ".checkpoint").exists()  # cleared when done
    # the chunks done before the kill were not redone
    if kill_after == 3:  # relp's 2 chunks and atp's first came from the checkpoints; the passes count both parts
        assert len(calls) == 1
        assert resumed["effects"]["atp"]["passes"] == full["effects"]["atp"]["passes"]
    else:
        assert resumed["timings"]["ablation_forward_passes"] < full["timings"]["ablation_forward_passes"]
