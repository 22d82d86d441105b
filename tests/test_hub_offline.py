"""The registered hub sets, run for real offline: ``info`` and ``discover`` through the real
``SAE.from_pretrained`` and transformers' ``from_pretrained``, reading a Hugging Face cache laid
out as the hub would (tests/hub_cache.py) with ``HF_HUB_OFFLINE=1``. No loader is replaced:
a wrong release id, sae_id template or hook in the registry fails here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from featcircuits.adapters import site_kind, site_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_cache  # noqa: E402

DISCOVER = ["--task", "sva-simple", "--n", "4", "--batch-size", "4", "--top-k", "8"]


def expected_hook(kind: str, layer: int, reads: str = "output") -> set[str]:
    """TransformerLens hook names (what sae-lens records) that read a featcircuits site."""
    from featcircuits.adapters import Site, transformer_lens_hooks

    return transformer_lens_hooks(Site("", kind, layer, "", False, reads))


@pytest.fixture(scope="module", params=["pythia-70m-deduped", "gemma-scope-2b"])
def hub(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, hub_cache.build_hub_cache(root, request.param, n_layers=2)


def run_set(name: str, root: Path, built: dict, env: dict | None = None):
    out = root / "circuit"
    spec = {"argv": [["info", "--model", built["model"], "--saes", name],
                     ["discover", "--model", built["model"], "--saes", name, "--out", str(out), *DISCOVER]],
            "dump": str(root / "dump.json"), "model": built["model"], "saes": name}
    proc = hub_cache.run_offline(built["hub"], spec, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump = json.loads((root / "dump.json").read_text())
    return proc, dump, out


def check_sites(name: str, built: dict, dump: dict) -> None:
    assert dump["codes"] == [0, 0]
    assert built["requested"] and not built["missing"], f"ids sae-lens's table lacks: {built['missing']}"
    for site, d in dump["sites"].items():
        kind, layer = site_kind(site), site_layer(site)
        if site not in built["requested"]:
            assert d["source"] == "identity"
            continue
        release, sae_id = built["requested"][site]
        assert d["source"] == f"saelens:{release}/{sae_id}"
        assert d["hook_name"] in expected_hook(kind, layer, d["reads"]), f"{site} reads {d['hook_name']}"
        if d["hf_hook_name"] is not None:  # Gemma Scope 2 also names the HF module it read
            assert d["hf_hook_name"] == f"{d['path']}.{'input' if d['reads'] == 'z' else 'output'}"
        assert d["d_sae"] == hub_cache.STAND_INS[name]["d_sae"]
        # Gemma Scope's attention SAEs read hook_z: the real loader records it, the site sits at
        # o_proj's input and the SAE's width is n_heads * head_dim, not d_model
        at_z = bool(hub_cache.STAND_INS[name].get("attn_at_z")) and kind == "attn"
        assert (d["reads"] == "z") == at_z, site
        if at_z:
            heads, head_dim = hub_cache.STAND_INS[name]["heads"]
            assert d["path"].endswith(f"layers.{layer}.self_attn.o_proj") and d["d_in"] == heads * head_dim
            assert d["d_in"] != hub_cache.STAND_INS[name]["d_model"]


def test_registered_set_runs_offline_through_real_loaders(hub):
    name, root, built = hub
    proc, dump, out = run_set(name, root, built)
    check_sites(name, built, dump)
    assert f"dictionaries {name}" in proc.stdout
    if hub_cache.STAND_INS[name].get("attn_at_z"):  # info says where the attn sites read
        assert "self_attn.o_proj (input: hook_z)" in proc.stdout
    check_circuit(name, built, out)


def check_circuit(name: str, built: dict, out: Path) -> None:
    """discover wrote a graph with nodes at the hub dictionaries' sites."""
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["model"], summary["saes"], summary["pairs_dropped"]) == (built["model"], name, 0)
    assert (out / "graph.json").is_file() and summary["n_nodes"] > 0
    assert set(summary["n_nodes_by_site"]) & set(built["requested"]), summary["n_nodes_by_site"]


def test_gemma_scope_2_runs_from_the_cache_without_a_request(tmp_path):
    """sae-lens 6.54's gemma_3 loader fetches each safetensors header over HTTP even with
    HF_HUB_OFFLINE=1 (``get_safetensors_tensor_shapes``); featcircuits reads it from the cached
    file instead. A local server stands in for the hub and must be asked for nothing."""
    name = "gemma-scope-2-270m"
    built = hub_cache.build_hub_cache(tmp_path, name, n_layers=2)
    with hub_cache.range_server(built["hub"]) as (endpoint, asked):
        proc, dump, out = run_set(name, tmp_path, built, env={"HF_ENDPOINT": endpoint})
    check_sites(name, built, dump)
    check_circuit(name, built, out)
    assert not asked, asked


def test_a_hub_sae_at_the_wrong_site_is_refused():
    """A registry entry that puts a residual SAE at an MLP site stops with a clear error
    instead of splicing it in silently (sae-lens records which hook each SAE read)."""
    from types import SimpleNamespace

    from featcircuits.adapters import Site
    from featcircuits.dictionaries import check_hook
    from featcircuits.errors import UserError

    def sae_reading(hook: str, hf_hook: str | None = None):
        meta = SimpleNamespace(hook_name=hook, hf_hook_name=hf_hook)
        return SimpleNamespace(sae=SimpleNamespace(cfg=SimpleNamespace(metadata=meta)), source="saelens:r/id")

    mlp = Site("mlp_0", "mlp", 0, "model.layers.0.post_feedforward_layernorm", False)
    check_hook(mlp, sae_reading("blocks.0.hook_mlp_out"))
    check_hook(mlp, sae_reading("blocks.0.hook_mlp_out", "model.layers.0.post_feedforward_layernorm.output"))
    with pytest.raises(UserError, match="reads blocks.0.hook_resid_post, not the site mlp_0"):
        check_hook(mlp, sae_reading("blocks.0.hook_resid_post"))
    with pytest.raises(UserError, match="not the site mlp_0"):
        check_hook(mlp, sae_reading("blocks.0.hook_mlp_out", "model.layers.0.mlp.output"))
