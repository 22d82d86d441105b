"""scripts/starter_targets.py on a tiny model with a random set: the per-task row, its error
shares and the error nodes it names, and the before/after table's clear error."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from featcircuits.dictionaries import load_dictionary_set
from featcircuits.testing import random_saelens_set
from featcircuits.tracing import SplicedModel
from featcircuits.tasks import make_pairs, tokenize_pairs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "starter_targets.py"


def _script(name: str):
    """scripts/NAME.py as a fresh module (scripts/ on the path while it loads: scripts import
    each other, e.g. sae_report and starter_targets)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return mod


@pytest.fixture(scope="module")
def st():
    return _script("starter_targets")


def test_task_row_names_its_error_nodes(st, tiny, tmp_path):
    random_saelens_set(tiny, tmp_path, width=16)
    sm = SplicedModel(tiny, load_dictionary_set(str(tmp_path), tiny.adapter))
    row = st.task_row(sm, "sva-simple", 8, 8, (5, 20), batch_size=8)
    for k in ("5", "20"):
        size = row["sizes"][k]
        assert 0.0 <= size["error_share"] <= 1.0
        tops = size["top_error_nodes"]
        # each named error node is a site of the model, its share at most the whole error share
        assert len(tops) == min(5, size["n_error_nodes"])
        assert all(site in sm.dictionaries.dictionaries for site, _ in tops)
        assert sum(share for _, share in tops) <= size["error_share"] + 1e-3
        assert [share for _, share in tops] == sorted((share for _, share in tops), reverse=True)
    r = {"saes": str(tmp_path), "label": "t", "dictionaries_sha256": "0" * 16, "report": "r.json", "n": 8, "n_eval": 8,
         "sizes": [5, 20], "sites": {}, "tasks": {"sva-simple": row}}
    table = "\n".join(st.render_error_nodes(r))
    assert "largest error nodes" in table and all(site in table for site, _ in row["sizes"]["5"]["top_error_nodes"])


def test_table_names_a_missing_measurement(st, tmp_path, monkeypatch):
    (tmp_path / "before.json").write_text(json.dumps({}))
    monkeypatch.setattr(sys, "argv", ["starter_targets.py", "--out", str(tmp_path), "--table", "before", "v9"])
    with pytest.raises(SystemExit, match="no measurement v9 .*there: before"):
        st.main()


def test_render_judges_again_on_the_pair_split_means_of_this_set_only(st, tmp_path, monkeypatch):
    """--render adds the faithfulness_spread means of the set with this sha256 (not another set's)
    right below the split-0 rows they repeat, each with its own verdict."""
    def summary(err, faith):
        return {"100": {"error_share_mean": err, "error_share_sd": 0.01, "faithfulness_mean": 0.3, "faithfulness_sd": 0.1},
                "200": {"error_share_mean": err, "error_share_sd": 0.01, "faithfulness_mean": faith, "faithfulness_sd": 0.05}}
    for task, err in (("sva-simple", 0.20), ("ioi", 0.70)):
        (tmp_path / f"faith_spread-{task}.json").write_text(json.dumps({"task": task, "seeds": [0, 1, 2], "sets": {
            "this": {"dictionaries_sha256": "abcd" * 4, "summary": summary(err, 0.55)},
            "other": {"dictionaries_sha256": "ffff" * 4, "summary": summary(0.1, 0.9)}}}))
    split0 = {"sizes": {"100": {"faithfulness": 0.3, "completeness": 0.0, "error_share": 0.2},
                        "200": {"faithfulness": 0.49, "completeness": 0.0, "error_share": 0.2}}, "F_M": 5.0}
    r = {"saes": "s", "label": "t", "dictionaries_sha256": "abcd" * 4, "report": "r.json", "n": 8, "n_eval": 8,
         "sizes": [100, 200], "tasks": {"sva-simple": split0},
         "sites": {"sva-simple": {"median_recovered": 0.9, "resid_below_half": []},
                   "ioi": {"median_recovered": 0.9, "resid_below_half": []},
                   "share_sites_dead_under_10pct": 1.0, "max_l0": 64}}
    (tmp_path / "t.json").write_text(json.dumps(r))
    monkeypatch.setattr(sys, "argv", ["starter_targets.py", "--out", str(tmp_path), "--render", "t"])
    assert st.main() == 0
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0] for row in rows]
    at = next(i for i, n in enumerate(names) if n.startswith("| error share of top-100"))
    assert rows[at + 1] == "| same, mean of 3 pair splits (2 tasks) | worst 70.0% ± 1.0% (ioi) | **no** |"
    at = next(i for i, n in enumerate(names) if n.startswith("| faithfulness of top-200"))
    assert rows[at].endswith("| 0.490 | **no** |") and rows[at + 1] == "| same, mean of 3 pair splits | 0.550 ± 0.050 | yes |"


def test_ioi_roles_are_found_from_the_answers_not_assumed(tiny):
    """scripts/ioi_positions.py's role masks: the subject is the answer that occurs twice,
    whichever of the two answers it is, and BOS and padding belong to no role."""
    mod = _script("ioi_positions")
    import torch

    # BOS=1, pad=0; names 7 and 8; prompt 0: "7 and 8 ... 7 to", prompt 1 (left-padded): "8 and 7 ... 8 to"
    ids = torch.tensor([[1, 5, 7, 3, 8, 4, 7, 6], [0, 1, 8, 3, 7, 4, 8, 6]])
    mask = (ids != 0).long()
    io, s = torch.tensor([8, 7]), torch.tensor([7, 8])  # answers: IO first, then the repeated subject
    m = mod.role_masks(ids, mask, io, s, bos=1)
    assert torch.nonzero(m["S1"]).tolist() == [[0, 2], [1, 2]]
    assert torch.nonzero(m["S2"]).tolist() == [[0, 6], [1, 6]]
    assert torch.nonzero(m["IO"]).tolist() == [[0, 4], [1, 4]]
    assert m["END"][:, -1].all() and not (m["S1"] & m["other"]).any()
    m2 = mod.role_masks(ids, mask, s, io, bos=1)  # answers swapped: the same roles
    assert all(torch.equal(m[k], m2[k]) for k in m)
    assert not (m["all"][0, 0] or m["all"][1, 0] or m["all"][1, 1])  # BOS and padding are in no role
    assert int(m["all"].sum()) == int(sum(m[k].sum() for k in ("S1", "S2", "IO", "END", "other")))


def test_corpus_names_counts_each_single_token_form_and_marks_the_rest(tiny):
    """scripts/corpus_names.py: occurrences of ' Name' and 'Name' in the training windows, -1
    for a form the tokenizer splits (no single token to count)."""
    import torch

    mod = _script("corpus_names")
    tok = tiny.tokenizer
    mary = tok.encode(" Mary", add_special_tokens=False)
    assert len(mary) == 1
    other = tok.encode(" the", add_special_tokens=False)
    train = torch.tensor([[tok.bos_token_id, *mary, *other, *mary], [tok.bos_token_id, *other, *other, *mary]])
    counts = mod.name_counts(train, tok, ["Mary", "Mary Mary"])
    assert counts["Mary"]["' Mary'"] == 3
    assert counts["Mary Mary"]["' Mary Mary'"] == -1  # two tokens: not counted


def test_ioi_name_subspace_is_orthonormal_with_one_direction_fewer_than_names(tiny):
    """scripts/ioi_positions.py's names' subspace: an orthonormal basis of the names' centred
    mean activations (n names span n - 1 directions once centred)."""
    import torch

    mod = _script("ioi_positions")
    from featcircuits.tasks import make_pairs, tokenize_pairs

    batch, _ = tokenize_pairs(make_pairs("ioi", 8, 0), tiny.tokenizer)
    roles = mod.role_masks(batch.clean_ids, batch.clean_mask, batch.clean_answer, batch.patch_answer,
                           tiny.tokenizer.bos_token_id)
    where = roles["S1"] | roles["S2"] | roles["IO"]
    n_names = len(set(batch.clean_ids[where].tolist()))
    site = tiny.adapter.site("resid_1")
    q = mod.name_subspace(SplicedModel(tiny), {"input_ids": batch.clean_ids, "attention_mask": batch.clean_mask},
                          site, batch.clean_ids, where)
    assert q.shape == (tiny.adapter.d_model, n_names - 1)
    assert torch.allclose(q.T @ q, torch.eye(n_names - 1), atol=1e-5)
    r = mod.random_subspace(tiny.adapter.d_model, 3, 0)
    assert torch.allclose(r.T @ r, torch.eye(3), atol=1e-5)


def test_held_out_names_measures_both_name_lists_per_site(tiny, tmp_path):
    """scripts/held_out_names.py: every site gets IOI on the task's names and on the held-out
    names, measured on pairs that really use those names; the table lists each site once."""
    from featcircuits.tasks import ioi_pairs, tokenize_pairs

    mod = _script("held_out_names")
    from featcircuits.tasks import NAMES

    # The tiny word-level vocabulary holds the task's words only, so six of the task's own names
    # stand in for the held-out ones: this checks the measurement's plumbing, not the names.
    mod.HELD_OUT_NAMES = tuple(NAMES[-6:])
    random_saelens_set(tiny, tmp_path / "set", width=16)
    batch, dropped = tokenize_pairs(ioi_pairs(mod.HELD_OUT_NAMES, 6, 1), tiny.tokenizer)
    assert len(batch) == 6 and not dropped
    res = mod.measure(tiny, [str(tmp_path / "set")], "resid", 6, 1)
    sites = res["sets"][str(tmp_path / "set")]["sites"]
    assert sites and all(n.startswith("resid") for n in sites)
    assert all(set(r) == {"ioi", "ioi-held-out-names"} for r in sites.values())
    assert res["pairs"] == {"ioi": 6, "ioi-held-out-names": 6}
    table = mod.render(res, "held_out_names.py --saes X")
    assert all(table.count(f"| {n} |") == 1 for n in sites)
    # a partial set (a run trained at one site) is measured at that site only, beside a full one
    random_saelens_set(tiny, tmp_path / "part", width=16, sites=["resid_0"])
    both = mod.measure(tiny, [str(tmp_path / "set"), str(tmp_path / "part")], "resid", 6, 1)
    assert list(both["sets"][str(tmp_path / "part")]["sites"]) == ["resid_0"]
    assert mod.render(both, "x").count("| resid_0 |") == 1
    with pytest.raises(SystemExit):
        mod.measure(tiny, [str(tmp_path / "part")], "attn", 6, 1)


def test_error_sites_splits_each_resid_cut_and_keeps_all_with_exact_dictionaries(tiny, tmp_path):
    """scripts/error_sites.py: per pair, the features + error of every residual site add up to the
    behaviour (two-point RelP conserves each layer cut), the changed positions are where the two
    prompts differ, and an exact (identity) dictionary keeps all of the behaviour."""
    mod = _script("error_sites")
    from featcircuits.tasks import make_pairs, tokenize_pairs

    random_saelens_set(tiny, tmp_path / "set", width=16)
    sm = SplicedModel(tiny, load_dictionary_set(str(tmp_path / "set"), tiny.adapter))
    batch, _ = tokenize_pairs(make_pairs("ioi", 6, 0), tiny.tokenizer)
    roles = mod.roles(batch)
    differ = (batch.clean_ids != batch.patch_ids) & batch.clean_mask.bool()
    assert torch.equal(roles["changed"] | (roles["last"] & differ), differ)
    assert not (roles["changed"] & roles["other"]).any()
    r = mod.measure(sm, "ioi", 6, tiny.tokenizer.bos_token_id)
    gap = -r["metric_difference"]
    assert abs(gap) > 1e-3
    resid = [s for s in r["split"] if s.startswith("resid")]
    assert resid
    for s in resid:
        total = sum(f + e for f, e in r["split"][s].values())
        assert total == pytest.approx(gap, rel=1e-3, abs=1e-4), s
    assert len(r["per_pair_error_share"]) == 6 and 0.0 <= r["pooled_error_share"] <= 1.0
    plain = SplicedModel(tiny)  # identity dictionaries: reconstruction is exact, nothing is lost
    site = plain.sites[0]
    assert mod.difference_kept(plain, batch, site, tiny.tokenizer.bos_token_id,
                               mod.metric_difference(plain, batch)) == pytest.approx(1.0, abs=1e-4)
    md = mod.render("t", "X", [r])
    assert all(md.count(f"| {s} |") <= 1 for s in r["split"])


def test_ioi_error_subspace_holds_more_of_the_error_than_random_directions(tiny, tmp_path):
    """scripts/ioi_positions.py --error-ranks: the error's top-r directions are orthonormal and
    hold at least as much of the SAE's error energy as any r random directions do."""
    mod = _script("ioi_positions")
    from featcircuits.tasks import make_pairs, tokenize_pairs

    random_saelens_set(tiny, tmp_path / "set", width=16)
    dset = load_dictionary_set(str(tmp_path / "set"), tiny.adapter)
    batch, _ = tokenize_pairs(make_pairs("ioi", 8, 0), tiny.tokenizer)
    roles = mod.role_masks(batch.clean_ids, batch.clean_mask, batch.clean_answer, batch.patch_answer,
                           tiny.tokenizer.bos_token_id)
    where = roles["S1"] | roles["S2"] | roles["IO"] | roles["END"]
    inputs = {"input_ids": batch.clean_ids, "attention_mask": batch.clean_mask}
    site = tiny.adapter.site("resid_1")
    sm = SplicedModel(tiny)
    q = mod.error_subspace(sm, inputs, site, dset["resid_1"], where, 3)
    assert q.shape == (tiny.adapter.d_model, 3)
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
    x = mod.site_activations(sm, inputs, site)[where]
    with torch.no_grad():
        err = x - dset["resid_1"].decode(dset["resid_1"].encode(x)).float()
    top = float((err @ q).pow(2).sum())
    for seed in range(5):
        assert top >= float((err @ mod.random_subspace(q.shape[0], 3, seed)).pow(2).sum()) - 1e-5


def test_device_samples_fill_the_cache_that_train_saes_reads(tiny, tmp_path, monkeypatch):
    """scripts/device_samples.py (run on a GPU machine) fills the cache folder that train-saes'
    ``model_samples`` then reads without generating: same recipe key, same samples."""
    from featcircuits.training import samples as S

    ds = _script("device_samples")
    model = tiny
    report: dict = {}
    recipe = ds.fill(model.hf, model.tokenizer, tmp_path / "corpus", seconds=0.0, batch=4, round_chunks=2,
                     max_samples=100, seed=0, names=True, report=report, out=tmp_path, model_spec="tiny")
    assert recipe["chunks"] == 2 and len(report["rounds"]) == 1  # a zero budget still runs one round
    assert json.loads((tmp_path / "samples.json").read_text())["recipe"]["raw_sha256"] == recipe["raw_sha256"]

    def no_generation(*a, **k):
        raise AssertionError("train-saes generated samples the device had cached")

    monkeypatch.setattr(S, "_sample", no_generation)
    _, again = S.model_samples(model.hf, model.tokenizer, "tiny", 8, seed=0, batch=4, cache=tmp_path / "corpus",
                               progress=False, openers=S.opener_cycle(True))
    assert again["raw_sha256"] == recipe["raw_sha256"]
    monkeypatch.undo()
    capped = ds.fill(model.hf, model.tokenizer, tmp_path / "c2", seconds=1e9, batch=4, round_chunks=1,
                     max_samples=8, seed=0, names=False, report={}, out=tmp_path, model_spec="tiny")
    assert capped["chunks"] == 2  # stopped by max_samples, not the budget


def test_device_samples_need_neither_nnsight_nor_sae_lens():
    """The GPU image has torch and transformers only: the script's bare-package import of the
    sampler must not pull in featcircuits/__init__ (nnsight) or sae-lens."""
    import subprocess

    code = ("import sys; sys.path.insert(0, 'scripts'); import device_samples as d; d._bare_package(); "
            "import featcircuits.training.samples, featcircuits.models, featcircuits.io; "
            "bad = [m for m in ('nnsight', 'sae_lens') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=SCRIPT.parent.parent, check=True, timeout=120)


def test_faithfulness_spread_seed_zero_is_starter_targets_split(tiny, tmp_path):
    """scripts/faithfulness_spread.py: at seed 0 the same split and circuits as starter_targets'
    row (same faithfulness and error share), a bootstrap interval around each figure, and paired
    differences that are the two sets' figures subtracted seed by seed."""
    st = _script("starter_targets")
    fs = _script("faithfulness_spread")
    a, b = tmp_path / "a", tmp_path / "b"
    random_saelens_set(tiny, a, width=16, seed=0)
    random_saelens_set(tiny, b, width=16, seed=1)
    res = fs.measure(tiny, {"A": (str(a), None), "B": (str(b), None)}, "sva-simple", (5, 20), (0, 1), 8, 8, 200, 8)
    row = st.task_row(SplicedModel(tiny, load_dictionary_set(str(a), tiny.adapter)), "sva-simple", 8, 8, (5, 20), 8)
    for k in ("5", "20"):
        ours = res["sets"]["A"]["seeds"]["0"]["sizes"][k]
        assert ours["faithfulness"] == pytest.approx(row["sizes"][k]["faithfulness"], abs=1e-5)
        assert ours["error_share"] == pytest.approx(row["sizes"][k]["error_share"], abs=1e-6)
        for label in ("A", "B"):
            for r in res["sets"][label]["seeds"].values():
                lo, hi = r["sizes"][k]["bootstrap_90"]
                assert lo <= hi
        diffs = res["paired"]["B - A"][k]["faithfulness"]
        assert diffs[1] == pytest.approx(res["sets"]["B"]["seeds"]["1"]["sizes"][k]["faithfulness"]
                                         - res["sets"]["A"]["seeds"]["1"]["sizes"][k]["faithfulness"])
    # the two seeds are different splits: the measure moves
    f = [r["sizes"]["20"]["faithfulness"] for r in res["sets"]["A"]["seeds"].values()]
    assert f[0] != f[1]
    assert "faithfulness per seed" in fs.render(res, "cmd")
    summary = fs.render_summary([res], ["x"])
    lower = sum(res["sets"]["B"]["seeds"][sd]["sizes"][k]["error_share"] < res["sets"]["A"]["seeds"][sd]["sizes"][k]["error_share"]
                for sd in ("0", "1") for k in ("5", "20"))
    assert f"| sva-simple | B | 2 |" in summary and f"{lower} of 4 (seed x size)" in summary


def test_faithfulness_spread_reuses_a_set_measured_before_and_only_that(tiny, tmp_path):
    """--reuse: a set already measured (same sha256, task, pairs, draws) is copied from the earlier
    file, and the copy equals measuring it again; a set that was not, or an earlier run of another
    measure (other pair count), is measured."""
    fs = _script("faithfulness_spread")
    a, b = tmp_path / "a", tmp_path / "b"
    random_saelens_set(tiny, a, width=16, seed=0)
    random_saelens_set(tiny, b, width=16, seed=1)
    both = fs.measure(tiny, {"A": (str(a), None), "B": (str(b), None)}, "sva-simple", (5, 20), (0, 1), 8, 8, 200, 8)
    earlier = {**fs.measure(tiny, {"old": (str(a), None)}, "sva-simple", (5, 20, 40), (0, 1), 8, 8, 200, 8), "_file": "x.json"}
    res = fs.measure(tiny, {"A": (str(a), None), "B": (str(b), None)}, "sva-simple", (5, 20), (0, 1), 8, 8, 200, 8, [earlier])
    assert res["sets"]["A"]["reused_from"] == "x.json" and "reused_from" not in res["sets"]["B"]
    for label in ("A", "B"):
        assert res["sets"][label]["summary"] == both["sets"][label]["summary"]
    assert res["paired"] == both["paired"]
    other = fs.measure(tiny, {"A": (str(a), None)}, "sva-simple", (5, 20), (0, 1), 6, 8, 200, 8, [earlier])
    assert "reused_from" not in other["sets"]["A"]
    # LABEL=SET@RULES: the same set under another rule set is measured, not copied, and its circuits
    # are RelP's under those rules; asking for the default by name reuses the default's rows
    paper = fs.measure(tiny, {"A": (str(a), "paper")}, "sva-simple", (5, 20), (0, 1), 8, 8, 200, 8, [earlier])
    assert "reused_from" not in paper["sets"]["A"] and paper["sets"]["A"]["rules"] == "paper"
    st = _script("starter_targets")
    disc, _ = tokenize_pairs(make_pairs("sva-simple", 8, 0), tiny.tokenizer)
    sm = SplicedModel(tiny, load_dictionary_set(str(a), tiny.adapter))
    _, eff_paper, masks_paper = st.top_k_circuits(sm, disc, (5, 20), 8, rules="paper")
    assert paper["sets"]["A"]["seeds"]["0"]["sizes"]["5"]["error_share"] == pytest.approx(
        st.error_share(eff_paper, masks_paper[0]), abs=1e-6)
    named = fs.measure(tiny, {"A": (str(a), "two-point")}, "sva-simple", (5, 20), (0, 1), 8, 8, 200, 8, [earlier])
    assert named["sets"]["A"]["reused_from"] == "x.json"


def test_site_shares_plot_orders_resid_sites_by_layer_and_leaves_unjudged_ones_as_gaps(tmp_path, monkeypatch):
    sp = _script("site_shares_plot")
    sites = {"resid_10": {"recovered": 0.2}, "attn_0": {"recovered": 0.9}, "resid_2": {"recovered": None},
             "resid_0": {"recovered": 1.0}}
    report = {"tasks": {"ioi": {"sites": sites}}}
    assert sp.resid_shares(report, "ioi") == ([0, 2, 10], [1.0, None, 0.2])
    (tmp_path / "a-saes.json").write_text(json.dumps(report))
    monkeypatch.setattr(sys, "argv", ["site_shares_plot.py", "a", "--dir", str(tmp_path), "--tasks", "ioi"])
    assert sp.main() == 0 and (tmp_path / "site_shares.png").stat().st_size > 1000
    monkeypatch.setattr(sys, "argv", ["site_shares_plot.py", "a", "b", "--dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no b-saes.json"):
        sp.main()
