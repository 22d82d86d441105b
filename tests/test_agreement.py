"""Agreement of the estimators with exact patching: the computation and the CLI, on tiny models."""

import json
import math

import pytest
import torch

from featcircuits import lrp

from featcircuits.agreement import feature_node, node_space, pearson, resolve_methods, run_agreement, write_agreement
from featcircuits.attribution import FeatureNode, exact_feature_effects, node_effects
from featcircuits.dictionaries import load_dictionary_set
from featcircuits.errors import UserError
from featcircuits.tasks import make_pairs, tokenize_pairs
from featcircuits.testing import random_saelens_set, tiny_model
from featcircuits.tracing import SplicedModel


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3", scale=0.1)


@pytest.fixture(scope="module")
def batch(model):
    return tokenize_pairs(make_pairs("ioi", 6), model.tokenizer)[0]


def test_pearson_basics():
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert pearson(x, x) == pytest.approx(1.0)
    assert pearson(x, -2 * x + 3) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, torch.zeros(50)))
    assert math.isnan(pearson(x[:1], x[:1]))


def test_methods_add_the_paper_or_ah_variant():
    """Beside the default (two-point) RelP the authors' rules; beside the authors' rules the AH variant."""
    specs = resolve_methods("atp,relp,ig")
    assert [s.name for s in specs] == ["atp", "relp", "relp:ln+identity+half", "ig"]
    assert set(specs[1].rules) == set(lrp.TWO_POINT_RULES) and specs[2].rules == ("ln", "identity", "half")
    specs = {s.name: s for s in resolve_methods("relp", "paper")}
    assert specs["relp"].rules == ("ln", "identity", "half") and specs["relp+ah"].rules == ("ln", "identity", "half", "ah")
    assert [s.name for s in resolve_methods("relp,relp:paper")] == ["relp", "relp:ln+identity+half"]  # no repeat
    assert [s.name for s in resolve_methods("atp,relp", add_ah=False)] == ["atp", "relp"]
    own = resolve_methods("atp,relp:half-qk+ln+identity,relp", add_ah=False)
    assert [s.name for s in own] == ["atp", "relp:ln+identity+half-qk", "relp"]  # canonical rule order
    assert own[1].base == "relp" and own[1].rules == ("ln", "identity", "half-qk")
    with pytest.raises(UserError, match="unknown LRP rule"):
        resolve_methods("relp:ln+bogus")
    with pytest.raises(UserError, match="names no rule"):
        resolve_methods("relp:")
    with pytest.raises(UserError, match="reference"):
        resolve_methods("exact,atp")
    with pytest.raises(UserError):
        resolve_methods("atp", "ln,bogus")


def test_exact_against_exact_is_one(model, batch):
    sm = SplicedModel(model)
    a = node_effects(sm, batch, "exact", batch_size=4, progress=False).components()
    b = node_effects(sm, batch, "exact", batch_size=3, progress=False).components()
    for kind in ("resid", "attn", "mlp"):
        ga = torch.stack([a[s.name] for s in sm.sites if s.kind == kind])
        gb = torch.stack([b[s.name] for s in sm.sites if s.kind == kind])
        assert pearson(ga, gb) == pytest.approx(1.0, abs=1e-6)


def test_exact_components_match_a_manual_patch_and_skip_unchanged_positions(model, batch):
    """The reference itself: each cell is m(clean | site at one position := patch value) - m(clean);
    positions where no prompt differs (before the names swap in IOI) are exactly 0."""
    from featcircuits.metric import metric
    from featcircuits.nodes import Act

    sm = SplicedModel(model)
    comp = node_effects(sm, batch, "exact", batch_size=6, progress=False).components()
    first_diff = int((batch.clean_ids != batch.patch_ids).any(0).nonzero()[0])
    assert first_diff > 0
    _, clean = sm.cache(batch.inputs("clean"))
    _, patch = sm.cache(batch.inputs("patch"))
    m_c = metric(sm.run(batch.inputs("clean")), batch.clean_answer, batch.patch_answer)
    for site in ("embed", "attn_1", "resid_0"):
        assert torch.all(comp[site][:first_diff] == 0)
        for pos in (first_diff, batch.seq_len - 1):
            x = clean[site].err.clone() + clean[site].f
            x[:, pos] = patch[site].f[:, pos]
            logits = sm.run_patched(batch.inputs("clean"), {site: Act(x, torch.zeros_like(x))})
            want = (metric(logits, batch.clean_answer, batch.patch_answer) - m_c).mean()
            assert comp[site][pos] == pytest.approx(float(want), abs=1e-5)


def test_components_agreement_end_to_end(model, batch, tmp_path):
    sm = SplicedModel(model)
    r = run_agreement(sm, batch, "atp,relp,ig", "components", batch_size=4, repeats=2, steps=4, progress=False)
    assert r["methods"] == ["atp", "relp", "relp:ln+identity+half", "ig"]
    assert r["n"] == len(batch) and set(r["site_kinds"]) == {"resid", "attn", "mlp", "embed"}
    for m in r["methods"]:
        assert set(r["pearson"][m]) == set(r["site_kinds"])
        assert all(-1.0001 <= v <= 1.0001 for v in r["pearson"][m].values() if v == v)
    assert set(r["seconds"]) == {"atp", "relp", "relp:ln+identity+half", "ig", "exact"}
    assert len(r["seconds_runs"]["atp"]) == 2 and len(r["seconds_runs"]["ig"]) == 1
    assert r["differing_positions"] and r["differing_positions"][-1] < batch.seq_len
    assert r["cells"]["embed"]["all"] == batch.seq_len
    grid = torch.tensor(r["grids"]["exact"]["resid"])
    assert grid.shape == (model.n_layers, batch.seq_len)
    assert pearson(grid, grid) == pytest.approx(1.0)
    # the grid compared is the prompt-averaged components of each method
    atp = node_effects(sm, batch, "atp", batch_size=4, progress=False).components()
    expect = torch.stack([atp[f"mlp_{layer}"] for layer in range(model.n_layers)])
    assert torch.allclose(torch.tensor(r["grids"]["atp"]["mlp"]), expect, atol=1e-6)
    paths = write_agreement(r, tmp_path, "tiny")
    names = {p.name for p in paths}
    assert {"agreement.json", "agreement.md", "scatter.png", "scatter.svg"} <= names
    data = json.loads((tmp_path / "agreement.json").read_text())
    assert {"pearson", "seconds", "n", "targets"} <= set(data)
    table = (tmp_path / "agreement.md").read_text()
    assert "RelP [paper: ln,identity,half]" in table and "Targets" in table


def test_components_agree_perfectly_on_a_linear_model():
    """No nonlinearity after the sites: every estimator equals exact, so r = 1 (grids aligned)."""
    model = tiny_model("llama", n_layers=1, scale=0.3)
    hf = model.hf
    with torch.no_grad():
        hf.model.layers[0].mlp.down_proj.weight.zero_()
        hf.model.layers[0].self_attn.o_proj.weight.zero_()
    hf.model.norm.forward = lambda x: x
    # sva-simple: the noun is the last token (attention is off, so nothing else reaches the metric)
    batch, _ = tokenize_pairs(make_pairs("sva-simple", 6), model.tokenizer)
    r = run_agreement(SplicedModel(model), batch, "atp,relp,relp:ln+identity+half-qk", "components",
                      batch_size=6, repeats=1, progress=False)
    assert r["method_params"]["relp:ln+identity+half-qk"]["rules"] == ["ln", "identity", "half-qk"]
    assert len(r["seconds_runs"]["relp:ln+identity+half-qk"]) == 1  # timed with the cheap estimators
    for m in ("atp", "relp", "relp:ln+identity+half", "relp:ln+identity+half-qk"):
        assert r["pearson"][m]["resid"] == pytest.approx(1.0, abs=1e-5)
        assert r["pearson"][m]["embed"] == pytest.approx(1.0, abs=1e-5)


def test_node_index_round_trip(model, batch, tmp_path):
    random_saelens_set(model, tmp_path, width=12)
    sm = SplicedModel(model, load_dictionary_set(str(tmp_path), model.adapter))
    ne = node_effects(sm, batch, "atp", batch_size=6, progress=False)
    for agg in ("sum", "none"):
        index = node_space(sm, agg, batch.seq_len)
        flat = index.flatten(ne.mean(agg))
        assert flat.numel() == index.size
        mean = ne.mean(agg)
        feats, errs = {s: v.f for s, v in mean.items()}, {s: v.err for s, v in mean.items()}
        for i in (0, 5, 12, index.size // 2, index.size - 1):
            node = feature_node(index, i)
            if node.position is None:
                want = errs[node.site] if node.index < 0 else feats[node.site][node.index]
            else:
                want = errs[node.site][node.position] if node.index < 0 else feats[node.site][node.position, node.index]
            assert flat[i] == want


def test_features_agreement_samples_and_describes(model, batch, tmp_path):
    random_saelens_set(model, tmp_path / "saes", width=12)
    sm = SplicedModel(model, load_dictionary_set(str(tmp_path / "saes"), model.adapter))
    r = run_agreement(sm, batch, "atp,relp", "features", batch_size=6, repeats=1, top_k=3, n_random=5,
                      progress=False)
    s = r["sample"]
    assert s["top_k"] == 3 and s["random"] == 5 and "uniformly" in s["description"]
    assert set(s["per_kind"]) == set(r["site_kinds"])
    nodes = s["nodes"]
    assert sum(v["sampled"] for v in s["per_kind"].values()) == len(nodes)
    assert any("random" in n["selected_by"] for n in nodes)
    assert any(src.startswith("top:relp") for n in nodes for src in n["selected_by"])
    # the exact values in the sample are exact_feature_effects of those nodes
    picked = nodes[:4]
    fn = [FeatureNode(n["site"], -1 if n["feature"] == "err" else n["feature"], n["position"]) for n in picked]
    again = exact_feature_effects(sm, batch, fn, batch_size=6, progress=False)
    assert torch.allclose(again, torch.tensor([n["exact"] for n in picked]), atol=1e-5)
    for m in r["methods"]:
        assert set(r["pearson"][m]) == set(r["site_kinds"])


def test_cli_end_to_end(model, tmp_path, capsys):
    from featcircuits.cli import main

    folder = tmp_path / "model"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    rc = main(["agreement", "--model", str(folder), "--task", "sva-simple", "--n", "4", "--methods", "atp,relp",
               "--granularity", "components", "--repeats", "1", "--quiet", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "agreement.json").read_text())
    assert {"pearson", "seconds", "n"} <= set(data) and data["n"] == 4
    assert set(data["pearson"]) == {"atp", "relp", "relp:ln+identity+half"}
    assert {"resid", "attn", "mlp"} <= set(data["pearson"]["relp"])
    assert (out / "scatter.png").stat().st_size > 0 and (out / "scatter.svg").is_file()
    assert (out / "agreement.md").is_file()
    assert "Pearson r" in capsys.readouterr().out
    out2 = tmp_path / "out2"
    rc = main(["agreement", "--model", str(folder), "--task", "ioi", "--n", "4", "--methods", "atp,relp,ig",
               "--steps", "2", "--granularity", "features", "--saes", "identity", "--top-k", "2", "--random", "3",
               "--repeats", "1", "--quiet", "--out", str(out2)])
    assert rc == 0
    data = json.loads((out2 / "agreement.json").read_text())
    assert data["granularity"] == "features" and "sample" in data and "ig" in data["seconds"]
    from featcircuits.dictionaries import identity_set

    # provenance: the digest of the weights the run used (what `starter` resolved to, for a named set)
    assert data["dictionaries_sha256"] == identity_set(model.adapter).digest()


def test_cli_refuses_bad_arguments(model, tmp_path, capsys):
    from featcircuits.cli import main

    assert main(["agreement", "--methods", "atp,bogus", "--out", str(tmp_path / "x")]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["agreement", "--saes", "starter", "--granularity", "components", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_agreement_by_case(model, batch, tmp_path):
    """IOI mixes two word orders: each gets its own Pearson r, computed on its pairs alone."""
    from featcircuits.agreement import markdown_table

    sm = SplicedModel(model)
    res = run_agreement(sm, batch, "atp,relp", "components", repeats=1, progress=False, add_ah=False)
    cases = {p.case for p in batch.pairs}
    assert set(res["by_case"]) == cases == {"io-first", "s-first"}
    assert sum(c["n"] for c in res["by_case"].values()) == len(batch)
    for case, c in res["by_case"].items():
        alone = run_agreement(sm, batch.select([i for i, p in enumerate(batch.pairs) if p.case == case]),
                              "atp,relp", "components", repeats=1, progress=False, add_ah=False)
        assert c["pearson_all"] == alone["pearson_all"] and "by_case" not in alone
    assert "By case" in markdown_table(res)
    one = run_agreement(sm, batch, "atp", "components", repeats=1, progress=False, add_ah=False, by_case=False)
    assert "by_case" not in one
