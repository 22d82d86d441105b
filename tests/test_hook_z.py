"""Attention sites read at hook_z (Gemma Scope's attention SAEs): features and error live at
the heads' concatenated outputs before ``o_proj``, which runs on ``z_hat + err`` after the splice.
A tiny Gemma 2 whose hook_z (4 heads x 12 = 48) is wider than d_model (32), as in the real
Gemma 2 2B (2048 vs 2304), with sae-lens SAEs written in sae-lens's own format."""

import json

import pytest
import torch

from featcircuits.gradient_store import GradientStore
from featcircuits.adapters import Site
from featcircuits.attribution import node_effects, site_gradients
from featcircuits.cli import main
from featcircuits.dictionaries import check_hook, load_dictionary_set, precheck_dictionary_set
from featcircuits.direct_effect import direct_effects, to_residual
from featcircuits.edges import edge_effects
from featcircuits.errors import UserError
from featcircuits.graph import Thresholds, select_nodes
from featcircuits.metric import metric
from featcircuits.nodes import Act
from featcircuits import lrp
from featcircuits.tasks import make_pairs, tokenize_pairs
from featcircuits.testing import random_saelens_set, tiny_model
from featcircuits.tracing import SplicedModel

HEAD_DIM = 12  # 4 heads x 12 = 48 != d_model 32


@pytest.fixture(scope="module", params=["gemma2", "llama"])
def z_model(request):
    return tiny_model(request.param, scale=0.1, head_dim=HEAD_DIM)


@pytest.fixture(scope="module")
def z_set(tmp_path_factory):
    model = tiny_model("gemma2", scale=0.1, head_dim=HEAD_DIM)
    folder = tmp_path_factory.mktemp("z_saes")
    random_saelens_set(model, folder, width=16, attn_z=True)
    sm = SplicedModel(model, load_dictionary_set(str(folder), model.adapter))
    batch, _ = tokenize_pairs(make_pairs("ioi", 4), model.tokenizer)
    return sm, batch, folder


def _o_proj_inputs(model, batch):
    """What o_proj of every layer really receives, from plain torch hooks (no nnsight)."""
    seen = {}
    hooks = [model.adapter.z_readout_modules(model.hf, layer)[0].register_forward_pre_hook(
        lambda mod, args, layer=layer: seen.__setitem__(layer, args[0].detach().clone()))
        for layer in range(model.n_layers)]
    try:
        with torch.no_grad():
            logits = model.hf(**batch.inputs(), logits_to_keep=1).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()
    return logits, seen


def test_splice_at_z_is_exact_and_reads_o_proj_input(z_model, tmp_path):
    a = z_model.adapter
    assert a.z_width == 4 * HEAD_DIM != a.d_model
    random_saelens_set(z_model, tmp_path, width=16, attn_z=True)
    dicts = load_dictionary_set(str(tmp_path), a)
    assert dicts.z_sites() == [f"attn_{layer}" for layer in range(a.n_layers)]
    sm = SplicedModel(z_model, dicts)
    assert [s.reads for s in sm.sites if s.kind == "attn"] == ["z"] * a.n_layers
    assert sm.site("attn_0").path.endswith("layers.0.self_attn.o_proj")
    batch, _ = tokenize_pairs(make_pairs("ioi", 4), z_model.tokenizer)
    ref, o_in = _o_proj_inputs(z_model, batch)
    logits, values = sm.cache(batch.inputs())
    assert torch.equal(logits, ref)  # x_hat + err is x: splicing changes no output
    for layer in range(a.n_layers):
        v = values[f"attn_{layer}"]
        assert v.f.shape[-1] == 16 and v.err.shape[-1] == a.z_width
        assert v.err.abs().max() > 1e-3  # a random SAE leaves a real error term
        d = dicts[f"attn_{layer}"]
        assert torch.allclose(d.decode(v.f) + v.err, o_in[layer], atol=1e-6)
    logits2, _ = sm.run_with_leaves(batch.inputs())
    assert torch.allclose(logits2, ref, atol=1e-6)
    values["attn_0"].f.zero_()  # z features feed o_proj: removing them changes the output
    assert (sm.run_patched(batch.inputs(), {"attn_0": values["attn_0"]}) - ref).abs().max() > 1e-4


def test_atp_at_z_matches_finite_differences(z_set):
    """AtP's gradient at a z feature (through o_proj, the post-attention norm and the rest)
    is the derivative of the metric along that feature's clean-to-counterfactual move; the
    same for the z error node. Central differences of the real forward, eps = 1e-3."""
    sm, batch, _ = z_set
    mean = node_effects(sm, batch, "atp", progress=False).mean("sum")
    ig1 = node_effects(sm, batch, "ig", steps=1, sites=["attn_0", "attn_1"], progress=False).mean("sum")
    with torch.no_grad():
        _, clean = sm.cache(batch.inputs("clean"))
        _, patch = sm.cache(batch.inputs("patch"))
    checked = 0
    for site in ("attn_0", "attn_1"):
        assert torch.isfinite(mean[site].f).all() and torch.isfinite(mean[site].err)
        assert torch.allclose(ig1[site].f, mean[site].f, atol=1e-5)  # IG with one step is AtP
        c, p = clean[site], patch[site]
        i = int(mean[site].f.abs().argmax())
        for index in (i, -1):
            def moved(eps, c=c, p=p, index=index):
                v = c.clone()
                if index < 0:
                    v.err += eps * (p.err - c.err)
                else:
                    v.f[..., index] += eps * (p.f[..., index] - c.f[..., index])
                with torch.no_grad():
                    logits = sm.run_patched(batch.inputs("clean"), {site: v})
                return float(metric(logits, batch.clean_answer, batch.patch_answer).mean())

            eps = 1e-3
            fd = (moved(eps) - moved(-eps)) / (2 * eps)
            atp = float(mean[site].err if index < 0 else mean[site].f[index])
            assert abs(atp) > 1e-4, (site, index)
            assert atp == pytest.approx(fd, rel=5e-3, abs=1e-5), (site, index)
            checked += 1
    assert checked == 4


def test_relp_at_z_finite_and_two_point_layer_cuts_conserve(z_set):
    sm, batch, _ = z_set
    for rules in ("paper", "two-point"):
        e = node_effects(sm, batch, "relp", rules=rules, progress=False)
        for v in e.effects.values():
            assert torch.isfinite(v.f).all() and torch.isfinite(v.err).all()
    total = e.metric_patch - e.metric_clean
    comps = e.components()
    for layer in range(sm.adapter.n_layers):  # z splices leave every resid cut exact
        assert float(comps[f"resid_{layer}"].sum()) == pytest.approx(total, rel=1e-3, abs=1e-5)


def test_two_point_edges_with_z_sites_sum_to_node_effects(z_set):
    """Two-point rules linearise each operation exactly between the two runs, so the edges into
    any downstream site sum to its node effects. Into resid_l the attn_l edges pass o_proj and
    Gemma's post-attention RMSNorm; into attn_l (at z) they pass the attention itself."""
    sm, batch, _ = z_set
    gradients = GradientStore()
    effects = node_effects(sm, batch, "relp", rules="two-point", batch_size=2, gradients=gradients,
                           progress=False)
    mean = effects.mean("sum")
    masks = select_nodes(mean, Thresholds(node=0.0))
    ee = edge_effects(sm, batch, masks, "relp", rules="two-point", batch_size=2, gradients=gradients,
                      progress=False)
    assert ("attn_0", "resid_0") in ee.weights and ("embed", "attn_0") in ee.weights
    assert ee.weights[("attn_0", "mlp_0")].f.shape[-1] == 16
    for site in ("attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1"):
        into = sum(float(wf.sum() + we.sum()) for (u, d), (wf, we) in ee.weights.items() if d == site)
        total = float(mean[site].f[masks[site].f].sum() + mean[site].err[masks[site].err].sum())
        assert abs(total) > 1e-5, site
        assert into == pytest.approx(total, rel=1e-3, abs=1e-5), site


def test_atp_edge_from_z_feature_to_resid_feature_matches_finite_differences(z_set):
    """One edge attn_0/i -> resid_0/j under AtP: d/de of g_j * encode(resid_0)_j when z
    feature i moves by e * (its patch - clean) and everything else feeding resid_0 is held,
    i.e. resid_0 = clean resid_0 - readout(z_c) + readout(z_c + e * dz_i), readout = o_proj
    then the post-attention norm (the adapter's ``z_readout_modules``), computed by hand."""
    sm, batch, _ = z_set
    mean = node_effects(sm, batch, "atp", progress=False).mean("sum")
    masks = select_nodes(mean, Thresholds(top_k=6))
    masks["resid_0"] = Act(torch.zeros_like(masks["resid_0"].f), torch.tensor(False))
    j = int(mean["resid_0"].f.abs().argmax())
    masks["resid_0"].f[j] = True
    ee = edge_effects(sm, batch, masks, "atp", progress=False)
    w = ee.weights[("attn_0", "resid_0")].f[0]  # [d_sae of attn_0]
    sg = site_gradients(sm, batch, "atp", sm.sites)
    g = sg.grads["resid_0"].f[..., j]
    c, p = sg.clean["attn_0"], sg.patch["attn_0"]
    d_attn, d_resid = sm.dictionary("attn_0"), sm.dictionary("resid_0")
    readout = sm.adapter.z_readout_modules(sm.model.hf, 0)
    assert len(readout) == 2  # o_proj, post_attention_layernorm

    def run(z):
        for module in readout:
            z = module(z)
        return z

    i = int((w.abs()).argmax())
    resid_c = d_resid.decode(sg.clean["resid_0"].f) + sg.clean["resid_0"].err
    z_c = d_attn.decode(c.f) + c.err

    def s(eps):
        f = c.f.clone()
        f[..., i] += eps * (p.f[..., i] - c.f[..., i])
        with torch.no_grad():
            x = resid_c - run(z_c) + run(d_attn.decode(f) + c.err)
            return float((g * d_resid.encode(x)[..., j]).sum()) / len(batch)

    eps = 1e-3
    fd = (s(eps) - s(-eps)) / (2 * eps)
    assert abs(float(w[i])) > 1e-6
    assert float(w[i]) == pytest.approx(fd, rel=5e-3, abs=1e-7)


def test_z_feature_direct_effect_goes_through_o_proj_and_the_norm_gain(z_set):
    """A z feature's residual direction is the LN-rule Jacobian of readout = norm(o_proj(z))
    along its decoder direction, divided by the norm's (constant) scale."""
    sm, _, _ = z_set
    site = sm.site("attn_1")
    d = sm.dictionary(site)
    with torch.no_grad():
        basis = torch.eye(d.d_sae)[:3]
        dirs = d.decode(basis) - d.decode(torch.zeros(1, d.d_sae))
    got = to_residual(sm.model, site, dirs)
    assert got.shape == (3, sm.adapter.d_model)
    o_proj, norm = sm.adapter.z_readout_modules(sm.model.hf, 1)
    z = torch.randn(1, sm.adapter.z_width)
    with lrp.lrp_rules({"ln"}):
        _, jvp = torch.func.jvp(lambda v: norm(o_proj(v)), (z.repeat(3, 1),), (dirs,))
    h = o_proj(z).detach()
    scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    assert torch.allclose(got, jvp / scale, atol=1e-5)
    eff = direct_effects(sm.model, d, torch.arange(3), k=4, site=site)
    assert eff["up_ids"].shape == (3, 4) and torch.isfinite(eff["up_val"]).all()


def test_discover_cli_runs_with_z_sites(z_set, tmp_path, capsys):
    sm, _, folder = z_set
    model_dir = tmp_path / "model"
    sm.model.hf.save_pretrained(model_dir)
    sm.model.tokenizer.save_pretrained(model_dir)
    assert main(["info", "--model", str(model_dir), "--saes", str(folder)]) == 0
    assert "self_attn.o_proj (input: hook_z)" in capsys.readouterr().out
    out = tmp_path / "circuit"
    assert main(["discover", "--model", str(model_dir), "--saes", str(folder), "--out", str(out),
                 "--task", "ioi", "--n", "4", "--batch-size", "4", "--top-k", "12"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_nodes"] > 0
    assert summary["hook_z_sites"] == ["attn_0", "attn_1"]


def test_wrong_point_is_refused(tmp_path):
    """A d_model SAE recorded as reading hook_z, a hook_z-wide SAE recorded as reading the
    attention output, and a hook_z SAE at a non-attention site: each one clear UserError."""
    model = tiny_model("gemma2", head_dim=HEAD_DIM)
    a = model.adapter
    random_saelens_set(model, tmp_path / "ok", width=8, sites={"attn_0"}, attn_z=True)
    cfg = json.loads((tmp_path / "ok" / "attn_0" / "cfg.json").read_text())
    assert cfg["d_in"] == a.z_width and cfg["metadata"]["hook_name"] == "blocks.0.attn.hook_z"

    def rewrite(name, **change):
        folder = tmp_path / name
        random_saelens_set(model, folder, width=8, sites={"attn_0"}, attn_z=change.pop("z", True))
        path = folder / "attn_0" / "cfg.json"
        cfg = json.loads(path.read_text())
        cfg["metadata"].update(change)
        cfg["reshape_activations"] = "hook_z" if (change.get("hook_name") or "").endswith("hook_z") else "none"
        path.write_text(json.dumps(cfg))
        return str(folder)

    # d_model-wide, but says hook_z
    wide = rewrite("d_model_at_z", z=False, hook_name="blocks.0.attn.hook_z")
    with pytest.raises(UserError, match=r"attn_0 \(hook_z\) reads width 32 but the site has width 48"):
        load_dictionary_set(wide, a)
    with pytest.raises(UserError, match="width 32 but the site has width 48"):
        precheck_dictionary_set(wide, a)
    # hook_z-wide, but records the attention output (or nothing)
    for hook in ("blocks.0.hook_attn_out", None):
        narrow = rewrite(f"z_at_output_{hook}", hook_name=hook)
        with pytest.raises(UserError, match="reads width 48 but the site has width 32.*hook_z"):
            load_dictionary_set(narrow, a)
    # hook_z at a residual site
    folder = tmp_path / "z_at_resid"
    random_saelens_set(model, folder / "tmp", width=8, sites={"attn_0"}, attn_z=True)
    (folder / "tmp" / "attn_0").rename(folder / "resid_0")
    with pytest.raises(UserError, match="only attention sites"):
        load_dictionary_set(str(folder), a)
    # the hub check: a hook_z SAE must sit at o_proj's input
    z_site = Site("attn_0", "attn", 0, "model.layers.0.self_attn.o_proj", False, "z")
    out_site = a.site("attn_0")

    def sae(hook, hf_hook=None):
        from types import SimpleNamespace

        meta = SimpleNamespace(hook_name=hook, hf_hook_name=hf_hook)
        return SimpleNamespace(sae=SimpleNamespace(cfg=SimpleNamespace(metadata=meta)), source="saelens:r/id")

    check_hook(z_site, sae("blocks.0.attn.hook_z", "model.layers.0.self_attn.o_proj.input"))
    with pytest.raises(UserError, match="not the site attn_0"):
        check_hook(out_site, sae("blocks.0.attn.hook_z"))
    with pytest.raises(UserError, match="not the site attn_0"):
        check_hook(z_site, sae("blocks.0.hook_attn_out"))
    with pytest.raises(UserError, match="not the site attn_0"):
        check_hook(z_site, sae("blocks.0.attn.hook_z", "model.layers.0.self_attn.o_proj.output"))


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_evaluation_ablates_at_z(z_set, ablation):
    """Ablation values at a z site have z's width; F(M) is the spliced model's clean preference
    and ablating every node moves it (the z values reach the output through o_proj)."""
    from featcircuits import evaluation as E
    from featcircuits.metric import preference

    sm, batch, _ = z_set
    ev = E.Evaluator(sm, batch, ablation=ablation)
    assert ev.values["attn_0"].err.shape[-1] == sm.adapter.z_width
    with torch.no_grad():
        logits, _ = sm.cache(batch.inputs("clean"))
    assert ev.F_M == pytest.approx(float(preference(logits, batch.clean_answer, batch.patch_answer).mean()), abs=1e-5)
    assert abs(ev.F_M - ev.F_empty) > 1e-3
    # only attn_0 (at z) ablated, every other site kept whole: the output moves
    masks = E.full_masks(sm, ev.sites)
    masks["attn_0"] = masks["attn_0"].map(torch.zeros_like)
    (f_c,) = ev.scores([masks])
    assert abs(f_c - ev.F_M) > 1e-4
