"""Faithfulness and completeness: ablation outside the circuit, measures, curves."""

import json

import pytest
import torch

from featcircuits import evaluation as E
from featcircuits.adapters import resolve
from featcircuits.attribution import FeatureNode, exact_feature_effects, node_effects
from featcircuits.dictionaries import load_dictionary_set
from featcircuits.nodes import Act, NodeSpace, pack
from featcircuits.metric import preference
from featcircuits.tasks import make_pairs, tokenize_pairs
from featcircuits.testing import random_saelens_set, tiny_model
from featcircuits.tracing import SplicedModel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is ~10x faster than two contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spliced(tmp_path_factory):
    """A tiny Gemma 3 with random sae-lens dictionaries (non-zero error terms) at every site."""
    model = tiny_model("gemma3", scale=0.2)
    folder = tmp_path_factory.mktemp("saes")
    random_saelens_set(model, folder, width=24)
    return SplicedModel(model, load_dictionary_set(str(folder), model.adapter))


@pytest.fixture(scope="module")
def batches(spliced):
    disc = make_pairs("sva-nounpp", 8, seed=0)
    ev, _ = E.eval_pairs("sva-nounpp", 8, disc, seed=0)
    tok = spliced.model.tokenizer
    return tokenize_pairs(disc, tok)[0], tokenize_pairs(ev, tok)[0]


def random_circuit(sm, sites, p=0.5, seed=0, positions=None):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in sites:
        d = sm.dictionary(s).d_sae
        shape_f = (d,) if positions is None else (positions, d)
        shape_e = () if positions is None else (positions,)
        out[s.name] = Act(torch.rand(shape_f, generator=gen) < p, torch.rand(shape_e, generator=gen) < p)
    return out


# ------------------------------------------------------------------------------------------
# Measures


@pytest.mark.parametrize("ablation", E.ABLATIONS)
@pytest.mark.parametrize("errors", E.ERROR_MODES)
def test_full_and_empty_circuits(spliced, batches, ablation, errors):
    _, ev_batch = batches
    ev = E.Evaluator(spliced, ev_batch, ablation=ablation, errors=errors, batch_size=4, stack=3)
    # F(M) is the unablated spliced metric
    with torch.no_grad():
        logits, _ = spliced.cache(ev_batch.inputs("clean"))
    unablated = float(preference(logits, ev_batch.clean_answer, ev_batch.patch_answer).double().mean())
    assert ev.F_M == pytest.approx(unablated, abs=1e-6)
    assert abs(ev.F_M - ev.F_empty) > 1e-3, "ablating everything must change the metric on this model"
    full = E.full_masks(spliced, ev.sites)
    empty = E.empty_masks(spliced, ev.sites)
    r_full, r_empty = ev.evaluate([full, empty])
    assert r_full["faithfulness"] == pytest.approx(1.0, abs=1e-6)
    assert r_full["completeness"] == pytest.approx(0.0, abs=1e-6)
    assert r_empty["faithfulness"] == pytest.approx(0.0, abs=1e-6)
    assert r_empty["completeness"] == pytest.approx(1.0, abs=1e-6)
    n_all = sum(spliced.dictionary(s).d_sae + (errors == "ablate") for s in ev.sites)
    assert r_full["n_nodes"] == n_all and r_empty["n_nodes"] == 0
    # a site a circuit does not name is fully ablated: the empty dict is the empty circuit
    assert ev.scores([{}])[0] == pytest.approx(ev.F_empty, abs=1e-6)


def test_stacking_and_chunking_do_not_change_scores(spliced, batches):
    _, ev_batch = batches
    sites = E.evaluated_sites(spliced)
    circuits = [random_circuit(spliced, sites, p, seed) for seed, p in enumerate((0.2, 0.5, 0.8))]
    a = E.Evaluator(spliced, ev_batch, batch_size=8, stack=1).scores(circuits)
    b = E.Evaluator(spliced, ev_batch, batch_size=3, stack=3).scores(circuits)
    assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_pair_scores_are_the_per_example_terms_of_scores(spliced, batches, ablation):
    _, ev_batch = batches
    sites = E.evaluated_sites(spliced)
    circuits = [random_circuit(spliced, sites, p, seed) for seed, p in enumerate((0.2, 0.7))]
    ev = E.Evaluator(spliced, ev_batch, ablation=ablation, batch_size=3, stack=2)
    per = ev.pair_scores(circuits + [E.full_masks(spliced, sites)])
    assert per.shape == (3, len(ev_batch))
    assert per.mean(1).tolist() == pytest.approx(ev.scores(circuits) + [ev.F_M], abs=1e-6)
    # the examples differ: a spread over pairs exists to be measured
    assert float(per[2].std()) > 1e-4


def test_start_layer_leaves_earlier_sites_alone(spliced, batches):
    _, ev_batch = batches
    ev = E.Evaluator(spliced, ev_batch, start_layer=1, batch_size=8)
    assert [s.name for s in ev.sites] == ["attn_1", "mlp_1", "resid_1"]
    # a circuit that names only earlier sites is the empty circuit at the evaluated ones
    early = E.empty_masks(spliced, [spliced.site("embed")])
    assert ev.scores([early])[0] == pytest.approx(ev.F_empty, abs=1e-6)


# ------------------------------------------------------------------------------------------
# Mean ablation against a hand-written ablation (plain torch forward hooks, no nnsight)


def _hand_ablated_preference(sm, batch, masks, errors="ablate"):
    hf, adapter = sm.model.hf, sm.adapter
    sites = adapter.sites()

    def run(inputs, fn):
        handles = []
        for s in sites:
            module = resolve(hf, s.path)

            def hook(mod, args, output, s=s):
                x = output[0] if s.tuple_output else output
                new = fn(s, x)
                if new is None:
                    return None
                return (new, *output[1:]) if s.tuple_output else new

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                return hf(**inputs, logits_to_keep=1).logits[:, -1, :]
        finally:
            for h in handles:
                h.remove()

    # 1) the mean of each site's features and error over the counterfactual prompts, per position
    assert bool(batch.patch_mask.all()), "this hand computation assumes no padding"
    means = {}

    def record(s, x):
        d = sm.dictionary(s.name)
        f = d.encode(x)
        means[s.name] = (f.mean(0), (x - d.decode(f)).mean(0))

    run(batch.inputs("patch"), record)

    # 2) the clean run with every node outside the circuit replaced by that mean
    def ablate(s, x):
        d = sm.dictionary(s.name)
        f = d.encode(x)
        err = x - d.decode(f)
        mf, me = masks[s.name]
        f_mean, e_mean = means[s.name]
        f2 = torch.where(mf, f, f_mean)
        e2 = err if (errors == "keep" or bool(me)) else e_mean.expand_as(err)
        return d.decode(f2) + e2

    logits = run(batch.inputs("clean"), ablate)
    return float(preference(logits, batch.clean_answer, batch.patch_answer).double().mean())


@pytest.mark.parametrize("errors", E.ERROR_MODES)
def test_mean_ablation_equals_hand_computed(spliced, batches, errors):
    _, ev_batch = batches
    ev = E.Evaluator(spliced, ev_batch, ablation="mean", errors=errors, batch_size=3)
    for seed, p in enumerate((0.3, 0.7)):
        masks = random_circuit(spliced, ev.sites, p, seed)
        masks["resid_0"] = Act(torch.zeros_like(masks["resid_0"].f), torch.tensor(False))
        masks["attn_1"] = Act(torch.ones_like(masks["attn_1"].f), torch.tensor(True))
        ours = ev.scores([masks])[0]
        hand = _hand_ablated_preference(spliced, ev_batch, masks, errors)
        assert ours == pytest.approx(hand, abs=1e-5)
        assert ours != pytest.approx(ev.F_M, abs=1e-4)


def test_zero_and_resample_values(spliced, batches):
    _, ev_batch = batches
    sites = E.evaluated_sites(spliced)
    z = E.ablation_values(spliced, ev_batch, sites, "zero")
    assert all(float(v.f.abs().sum()) == 0 and float(v.err.abs().sum()) == 0 for v in z.values())
    r1 = E.ablation_values(spliced, ev_batch, sites, "resample", seed=3)
    r2 = E.ablation_values(spliced, ev_batch, sites, "resample", seed=3)
    _, patch = spliced.cache(ev_batch.inputs("patch"))
    v = r1["resid_0"]
    assert v.f.shape[0] == len(ev_batch) and torch.equal(v.f, r2["resid_0"].f)
    # every resampled row is the counterfactual value of some evaluation example
    for row in v.f:
        assert any(torch.equal(row, p) for p in patch["resid_0"].f)


def test_per_position_masks(spliced, batches):
    """Aggregation ``none``: masks [T, d_sae] + [T]; a mask true at every position equals the
    per-feature mask, and masks from a shorter discovery batch align at the last token."""
    _, ev_batch = batches
    ev = E.Evaluator(spliced, ev_batch, batch_size=8)
    T = ev_batch.seq_len
    per_feature = random_circuit(spliced, ev.sites, 0.5, seed=1)
    per_position = {s: Act(m.f.expand(T, -1).clone(), m.err.expand(T).clone())
                    for s, m in per_feature.items()}
    a, b = ev.scores([per_feature, per_position])
    assert a == pytest.approx(b, abs=1e-6)
    m = Act(torch.ones(2, 5, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    al = E.align_positions(m, 4)
    assert al.f.shape == (4, 5) and not al.f[:2].any() and al.f[2:].all()
    assert E.align_positions(m, 1).f.shape == (1, 5)


# ------------------------------------------------------------------------------------------
# A model with a known mechanism: exact-effect circuits beat random ones


def _one_direction_model():
    """Llama, 2 layers, weak random blocks; the embedding of a noun carries its number in
    dimension 0 (+4 plural, -4 singular) and the unembedding reads only that dimension for
    the verbs (plural +, singular -). On ``sva-simple`` ("The authors" -> " are") the last
    token is the noun, so the answer runs embed[0] -> resid_0[0] -> resid_1[0] -> logits."""
    from featcircuits.tasks import NOUNS, VERBS

    model = tiny_model("llama", n_layers=2, scale=0.02)
    tok, hf = model.tokenizer, model.hf
    vocab = tok.get_vocab()
    with torch.no_grad():
        emb, unemb = hf.model.embed_tokens.weight, hf.lm_head.weight
        emb[:, 0] = 0.0
        unemb[:, 0] = 0.0
        for sing, plur in NOUNS:
            emb[vocab[sing], 0], emb[vocab[plur], 0] = -4.0, 4.0
        for sing, plur in VERBS:
            unemb[vocab[sing.strip()], 0], unemb[vocab[plur.strip()], 0] = -3.0, 3.0
    return model


def test_exact_effect_circuit_beats_random_on_a_known_mechanism():
    model = _one_direction_model()
    sm = SplicedModel(model)  # identity dictionaries: features are neurons
    disc_pairs = make_pairs("sva-simple", 16, seed=0)
    ev_pairs, _ = E.eval_pairs("sva-simple", 16, disc_pairs, seed=0)
    disc, _ = tokenize_pairs(disc_pairs, model.tokenizer)
    evb, _ = tokenize_pairs(ev_pairs, model.tokenizer)
    ev = E.Evaluator(sm, evb, ablation="mean", batch_size=16)
    assert ev.F_M - ev.F_empty > 1.0, "the model must do the task and ablation must remove it"
    nodes = [FeatureNode(s.name, i) for s in ev.sites for i in range(sm.dictionary(s).d_sae)]
    effects = exact_feature_effects(sm, disc, nodes, nodes_per_pass=16, progress=False)
    feats = {s.name: torch.zeros(sm.dictionary(s).d_sae) for s in ev.sites}
    for node, v in zip(nodes, effects):
        feats[node.site][node.index] = v
    errs = {s.name: torch.tensor(0.0) for s in ev.sites}
    scores, spans = E.candidate_effects(pack(feats, errs), ev.sites)
    exact = spans.unflatten(NodeSpace.top_k(scores, 3))
    chosen = {(s, int(i)) for s, m in exact.items() for i in torch.nonzero(m.f).flatten()}
    assert chosen == {("embed", 0), ("resid_0", 0), ("resid_1", 0)}
    gen = torch.Generator().manual_seed(0)
    random = [spans.unflatten(NodeSpace.random(scores, 3, gen)) for _ in range(5)]
    res = ev.evaluate([exact] + random)
    assert res[0]["faithfulness"] > 0.9
    assert max(r["faithfulness"] for r in res[1:]) < res[0]["faithfulness"] - 0.5
    # and the circuit is complete: removing it leaves (almost) nothing of the behaviour
    assert res[0]["completeness"] < 0.1
    # the gradient estimators find the same mechanism
    relp = node_effects(sm, disc, "relp", progress=False).mean("sum")
    r_scores, r_spans = E.candidate_effects(relp, ev.sites)
    assert ev.evaluate([r_spans.unflatten(NodeSpace.top_k(r_scores, 3))])[0]["faithfulness"] > 0.9


# ------------------------------------------------------------------------------------------
# Helpers: splits, grid, AUC


def test_eval_pairs_are_disjoint_from_discovery():
    for task in ("sva-simple", "ioi"):
        disc = make_pairs(task, 32, seed=0)
        ev, info = E.eval_pairs(task, 32, disc, seed=0)
        keys = {E.pair_key(p) for p in disc}
        assert len(ev) == 32 and not any(E.pair_key(p) in keys for p in ev)
        assert len({E.pair_key(p) for p in ev}) == 32
        assert info["eval_seed"] != 0 and info["n_eval"] == 32
        assert E.eval_pairs(task, 32, disc, seed=0)[0] == ev  # reproducible


def test_eval_pairs_too_many_is_a_user_error():
    from featcircuits.errors import UserError

    disc = make_pairs("sva-simple", 300, seed=0)
    with pytest.raises(UserError):
        E.eval_pairs("sva-simple", 300, disc, seed=0)


def test_size_grid_auc_and_threshold_crossing():
    g = E.size_grid(1000, 15)
    assert g[0] == 1 and g[-1] == 1000 and g == sorted(set(g)) and len(g) >= 12
    assert E.log_auc([1, 10, 100], [1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert E.log_auc([1, 10, 100], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert E.nodes_to_reach([1, 10, 100], [0.1, 0.85, 0.7]) == 10
    assert E.nodes_to_reach([1, 10], [0.1, 0.5]) is None


def test_random_masks_have_the_requested_size(spliced):
    sites = E.evaluated_sites(spliced)
    feats = {s.name: torch.randn(spliced.dictionary(s).d_sae) for s in sites}
    errs = {s.name: torch.tensor(0.5) for s in sites}
    gen = torch.Generator().manual_seed(0)
    for include in (True, False):
        scores, spans = E.candidate_effects(pack(feats, errs), sites, include_errors=include)
        for k in (1, 7, 40):
            m = spans.unflatten(NodeSpace.random(scores, k, gen))
            assert E.mask_size(m) == k
            if not include:
                assert not any(bool(x.err) for x in m.values())
        top = spans.unflatten(NodeSpace.top_k(scores, 5))
        assert E.mask_size(top) == 5


# ------------------------------------------------------------------------------------------
# Curves end to end on a tiny model


def test_curves_end_to_end(tmp_path, spliced):
    from featcircuits.evaluation import run_curves

    out = tmp_path / "curves"
    result = run_curves(spliced.model, spliced.dictionaries, task="sva-nounpp", n=8, n_eval=8, seed=0,
                         methods=["relp", "atp", "ig", "random"], points=6, steps=2, random_draws=2,
                         batch_size=4, out=out, model_spec="tiny-gemma3", progress=False)
    data = json.loads((out / "curves.json").read_text())
    assert (out / "curves.png").stat().st_size > 0 and (out / "curves.svg").stat().st_size > 0
    assert set(data["methods"]) == {"relp", "atp", "ig", "random"}
    sizes = data["sizes"]
    for m, c in data["methods"].items():
        assert c["n_nodes"] == sizes
        assert len(c["faithfulness"]) == len(c["completeness"]) == len(sizes)
        assert c["auc"] is not None
    assert data["F_M"] == pytest.approx(result["F_M"])
    assert data["split"]["n_eval"] == 8 and data["settings"]["n_discovery"] == 8
    assert "auc" in data["definitions"] and data["timings"]["total_seconds"] > 0
    # the largest circuit holds every node with a non-zero effect: close to the full model
    assert data["methods"]["relp"]["faithfulness"][-1] == pytest.approx(1.0, abs=0.25)


def test_curves_cli_parses():
    from featcircuits.cli import build_parser

    args = build_parser().parse_args(["curves", "--model", "x", "--saes", "identity", "--task", "ioi",
                                      "--methods", "relp,random", "--thresholds", "5", "--n", "4",
                                      "--n-eval", "4", "--out", "o"])
    assert args.methods == "relp,random" and args.thresholds == 5 and args.n_eval == 4
    args = build_parser().parse_args(["evaluate", "--circuit", "c", "--ablation", "zero", "--errors", "keep"])
    assert args.ablation == "zero" and args.errors == "keep"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, spliced):
    """The tiny model and its dictionaries on disk, so the CLI can load them by path."""
    root = tmp_path_factory.mktemp("tiny")
    spliced.model.hf.save_pretrained(root / "model")
    spliced.model.tokenizer.save_pretrained(root / "model")
    random_saelens_set(spliced.model, root / "saes", width=24)
    return root


def test_curves_cli_end_to_end(tiny_folder, tmp_path):
    from featcircuits.cli import main

    out = tmp_path / "c"
    rc = main(["curves", "--model", str(tiny_folder / "model"), "--saes", str(tiny_folder / "saes"),
               "--task", "ioi", "--methods", "relp,atp,random", "--thresholds", "5", "--n", "6",
               "--n-eval", "6", "--batch-size", "3", "--random-draws", "2", "--no-progress", "--out", str(out),
               "--effects-cache", str(tmp_path / "cache")])
    assert rc == 0
    data = json.loads((out / "curves.json").read_text())
    assert set(data["methods"]) == {"relp", "atp", "random"} and len(data["sizes"]) <= 5
    assert data["provenance"]["task"] == "ioi" and data["split"]["n_eval"] == 6
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    # a rerun reuses the cached node effects and gives the same curves
    rc = main(["curves", "--model", str(tiny_folder / "model"), "--saes", str(tiny_folder / "saes"),
               "--task", "ioi", "--methods", "relp,atp,random", "--thresholds", "5", "--n", "6",
               "--n-eval", "6", "--batch-size", "3", "--random-draws", "2", "--no-progress", "--out",
               str(tmp_path / "c2"), "--effects-cache", str(tmp_path / "cache")])
    again = json.loads((tmp_path / "c2" / "curves.json").read_text())
    assert rc == 0 and all(v["reused"] for v in again["provenance"]["effects_cache"].values())
    assert again["methods"]["relp"]["faithfulness"] == pytest.approx(data["methods"]["relp"]["faithfulness"])


def test_evaluate_cli_on_a_discovered_circuit(tiny_folder, tmp_path, capsys):
    from featcircuits.cli import main

    circ = tmp_path / "circuit"
    assert main(["discover", "--model", str(tiny_folder / "model"), "--saes", str(tiny_folder / "saes"),
                 "--task", "sva-nounpp", "--n", "8", "--top-k", "20", "--no-edges", "--out", str(circ)]) == 0
    assert main(["evaluate", "--circuit", str(circ), "--no-progress"]) == 0
    data = json.loads((circ / "evaluation.json").read_text())
    assert data["split"]["n_eval"] == 8 and data["n_nodes"] > 0
    assert data["faithfulness"] == pytest.approx((data["F_C"] - data["F_empty"]) / (data["F_M"] - data["F_empty"]))
    # the same numbers from the function underneath, and the full/empty sanity limits
    from featcircuits.evaluation import evaluate_circuit
    from featcircuits.export import load_circuit

    circuit = load_circuit(circ)
    model = tiny_model("gemma3", scale=0.2)
    dicts = load_dictionary_set(str(tiny_folder / "saes"), model.adapter)
    res = evaluate_circuit(model, dicts, circuit, task="sva-nounpp")
    assert res["faithfulness"] == pytest.approx(data["faithfulness"], abs=1e-6)
    out = capsys.readouterr().out
    assert "faithfulness" in out and "completeness" in out


def test_curves_by_case(spliced, batches):
    """Each case (sva-nounpp: singular / plural, agreeing with the subject) gets its own
    faithfulness curve and AUC, on its evaluation pairs alone."""
    disc, evb = batches
    res = E.faithfulness_curves(spliced, disc, evb, ["atp"], points=3, batch_size=4, stack=2, progress=False)
    cases = sorted({p.case for p in evb.pairs})
    assert len(cases) > 1 and sorted(res["by_case"]) == cases
    by = res["by_case"]
    assert sum(c["n_eval"] for c in by.values()) == len(evb)
    # nothing ablated: the per-case F(M), weighted by pairs, is the whole set's F(M)
    assert sum(c["F_M"] * c["n_eval"] for c in by.values()) / len(evb) == pytest.approx(res["F_M"], abs=1e-5)
    assert all(len(c["faithfulness"]["atp"]) == len(res["sizes"]) for c in by.values())
    assert "case " in E.curves_summary(res, "out")
    assert "by_case" not in E.faithfulness_curves(spliced, disc, evb, ["atp"], points=3, batch_size=4, stack=2,
                                                   progress=False, by_cases=False)
