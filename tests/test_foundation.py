"""Foundation: adapters, dictionaries in every format, exact splicing, tasks, CLI errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from featcircuits.adapters import adapter_for, site_kind
from featcircuits.cli import main
from featcircuits.dictionaries import load_dictionary, load_dictionary_set
from featcircuits.errors import UserError
from featcircuits.metric import metric, preference
from featcircuits.tasks import BUILTIN_TASKS, make_pairs, read_pairs, tokenize_pairs
from featcircuits.testing import random_ae_pt, random_saelens_set
from featcircuits.tracing import SplicedModel


def _batch(model, task="ioi", n=6):
    batch, dropped = tokenize_pairs(make_pairs(task, n), model.tokenizer)
    assert not dropped
    return batch


def test_sites_in_forward_order(any_family):
    sites = any_family.adapter.sites()
    assert [s.name for s in sites[:4]] == ["embed", "attn_0", "mlp_0", "resid_0"]
    assert len(sites) == 1 + 3 * any_family.n_layers
    assert {site_kind(s.name) for s in sites} == {"embed", "attn", "mlp", "resid"}


def test_unknown_architecture_names_supported():
    class Cfg:
        model_type = "bert"

    with pytest.raises(UserError, match="gemma3.*gpt2|gpt2.*gemma3"):
        adapter_for(Cfg())


def test_splicing_identity_dictionaries_is_exact(any_family):
    batch = _batch(any_family)
    ref = any_family.hf(**batch.inputs(), logits_to_keep=1).logits[:, -1]
    sm = SplicedModel(any_family)
    logits, values = sm.cache(batch.inputs())
    assert torch.allclose(logits, ref, atol=1e-5)
    assert all(v.err.abs().max() == 0 for v in values.values())


def test_splicing_random_saelens_and_ae_pt(any_family, tmp_path):
    random_saelens_set(any_family, tmp_path, width=48)
    # one site as a dictionary_learning ae.pt instead
    import shutil

    shutil.rmtree(tmp_path / "mlp_0")
    (tmp_path / "mlp_0").mkdir()
    random_ae_pt(tmp_path / "mlp_0" / "ae.pt", any_family.d_model, 40)
    dicts = load_dictionary_set(str(tmp_path), any_family.adapter)
    assert dicts.widths()["resid_0"] == 48 and dicts.widths()["mlp_0"] == 40
    batch = _batch(any_family)
    ref = any_family.hf(**batch.inputs(), logits_to_keep=1).logits[:, -1]
    sm = SplicedModel(any_family, dicts)
    logits, values = sm.cache(batch.inputs())
    assert (logits - ref).abs().max() <= 1e-4
    # features are readable and the error is not trivially zero
    assert values["resid_0"].f.shape[-1] == 48 and values["resid_0"].err.abs().max() > 0
    # leaves splice keeps the value and gives gradients to features and errors
    logits2, leaves = sm.run_with_leaves(batch.inputs())
    assert (logits2 - ref).abs().max() <= 1e-4
    m = metric(logits2, batch.clean_answer, batch.patch_answer).sum()
    gf, ge = torch.autograd.grad(m, [leaves["resid_0"].f, leaves["resid_0"].err])
    assert gf.abs().sum() > 0 and ge.abs().sum() > 0


def test_patching_features_changes_output(tiny, tmp_path):
    random_saelens_set(tiny, tmp_path, width=48)
    sm = SplicedModel(tiny, load_dictionary_set(str(tmp_path), tiny.adapter))
    batch = _batch(tiny)
    clean, values = sm.cache(batch.inputs())
    values["resid_0"].f.zero_()
    patched = sm.run_patched(batch.inputs(), {"resid_0": values["resid_0"]})
    assert (patched - clean).abs().max() > 1e-3


def test_width_mismatch_names_both_numbers(tiny, tmp_path):
    from featcircuits.testing import tiny_model

    other = tiny_model("gemma3", d_model=16)
    random_saelens_set(other, tmp_path, width=8, sites={"resid_0"})
    with pytest.raises(UserError, match="width 16.*width 32"):
        load_dictionary_set(str(tmp_path), tiny.adapter)


def test_load_dictionary_errors(tmp_path):
    with pytest.raises(UserError):
        load_dictionary(tmp_path / "nothing")
    bad = tmp_path / "bad.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(UserError, match="missing"):
        load_dictionary(bad)
    folder = tmp_path / "trunc"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "standard"}))
    (folder / "sae_weights.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="could not load"):
        load_dictionary(folder)


def test_sfc_files_read(shared_sfc, tiny):
    for name in ("simple_train.json", "nounpp_train.json", "within_rc_train.json"):
        pairs = read_pairs(shared_sfc / name)
        assert len(pairs) >= 480 and pairs[0].clean_answer.startswith(" ")
    pairs = make_pairs(str(shared_sfc / "simple_train.json"), 20)
    assert len(pairs) == 20


def test_malformed_json_line_number(tmp_path):
    f = tmp_path / "t.json"
    good = json.dumps({"clean_prefix": "a", "patch_prefix": "b", "clean_answer": " x", "patch_answer": " y"})
    f.write_text(good + "\n" + "{not json\n")
    with pytest.raises(UserError, match=r":2: not valid JSON"):
        read_pairs(f)
    f.write_text(json.dumps({"clean_prefix": "a"}) + "\n")
    with pytest.raises(UserError, match=r":1: missing field"):
        read_pairs(f)
    f.write_text("\n")
    with pytest.raises(UserError, match="no pairs"):
        read_pairs(f)


@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_generators_seeded_and_aligned(task, tiny):
    a, b = make_pairs(task, 12, seed=3), make_pairs(task, 12, seed=3)
    assert a == b and a != make_pairs(task, 12, seed=4)
    batch = _batch(tiny, task, 12)
    assert batch.clean_ids.shape == batch.patch_ids.shape
    # left padding: every prompt's last token is real
    assert batch.clean_mask[:, -1].all() and batch.patch_mask[:, -1].all()


def test_padding_keeps_prompts_of_different_lengths(tiny):
    from featcircuits.tasks import Pair

    pairs = [Pair("The author", "The authors", " is", " are"),
             Pair("The author near the desk", "The authors near the desk", " is", " are")]
    batch, dropped = tokenize_pairs(pairs, tiny.tokenizer)
    assert len(batch) == 2 and not dropped and batch.clean_mask[0].sum() < batch.clean_mask[1].sum()


def test_multi_token_answers_dropped_with_count(tiny):
    from featcircuits.tasks import Pair

    pairs = [Pair("The author", "The authors", " is", " are"), Pair("The author", "The authors", " is it", " are")]
    batch, dropped = tokenize_pairs(pairs, tiny.tokenizer)
    assert len(batch) == 1 and len(dropped) == 1 and "single token" in dropped[0][1]
    with pytest.raises(UserError, match="no usable pairs"):
        tokenize_pairs(pairs[1:], tiny.tokenizer)


def test_length_mismatched_pairs_dropped_naming_the_line(tiny, tmp_path):
    """Position-wise patching of prompts of different lengths would swap unrelated tokens:
    such pairs are dropped with the count and a reason naming the file line."""
    from featcircuits.tasks import Pair, describe_dropped, read_pairs, write_pairs

    path = tmp_path / "pairs.jsonl"
    write_pairs([Pair("The author", "The authors", " is", " are"),
                 Pair("The author", "The authors near the desk", " is", " are")], path)
    pairs = read_pairs(path)
    batch, dropped = tokenize_pairs(pairs, tiny.tokenizer)
    assert len(batch) == 1 and [i for i, _ in dropped] == [1]
    assert f"{path}:2" in dropped[0][1] and "2 tokens, patch prompt 5" in dropped[0][1]
    assert describe_dropped(dropped, 2).startswith("dropped 1 of 2 pairs: ")
    with pytest.raises(UserError, match=r"no usable pairs.*pairs.jsonl:2"):
        tokenize_pairs(pairs[1:], tiny.tokenizer)


@pytest.mark.slow
def test_length_mismatch_with_the_real_gemma_tokenizer(gemma_offline):
    """The cases a user hit: a longer counterfactual phrase, and a pronoun file where
    ' duke' and ' duchess' tokenize to different lengths."""
    from featcircuits.tasks import Pair

    tok = gemma_offline.tokenizer
    pairs = [Pair("The king said that", "The Queen of the Netherlands said that", " he", " she"),
             Pair("The keys to the cabinet", "The key to the cabinet", " are", " is")]
    batch, dropped = tokenize_pairs(pairs, tok)
    assert len(batch) == 1 and [i for i, _ in dropped] == [0] and "pair 0: clean prompt is" in dropped[0][1]
    duke, duchess = (len(tok(f"The {w} said that")["input_ids"]) for w in ("duke", "duchess"))
    batch, dropped = tokenize_pairs([Pair("The duke said that", "The duchess said that", " he", " she")]
                                    + pairs[1:], tok)
    assert (len(dropped) == 1) == (duke != duchess) and len(batch) == 2 - len(dropped)


def test_metric_sign():
    logits = torch.zeros(1, 5)
    logits[0, 1] = 3.0  # clean answer (token 1) preferred
    ca, pa = torch.tensor([1]), torch.tensor([2])
    assert metric(logits, ca, pa).item() == -3.0
    assert preference(logits, ca, pa).item() == 3.0


def test_cli_errors_exit_2(capsys, tmp_path):
    assert main(["info", "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featcircuits: error:") and "Traceback" not in err
    (tmp_path / "folder").mkdir()
    assert main(["info", "--model", str(tmp_path / "folder")]) == 2


def test_hub_set_resolves_release_ids_through_saelens(monkeypatch, tmp_path):
    """The registered Pythia set asks sae-lens for the right release/id per site; the hub is
    replaced by local files in the same format (SAE.load_from_disk)."""
    import sae_lens

    from featcircuits.testing import tiny_model

    model = tiny_model("gpt_neox")
    random_saelens_set(model, tmp_path, width=24, sites={"resid_0"})
    asked = []

    def fake_from_pretrained(release, sae_id, device="cpu", **kw):
        asked.append((release, sae_id))
        return sae_lens.SAE.load_from_disk(tmp_path / "resid_0", device=device)

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", classmethod(lambda cls, *a, **k: fake_from_pretrained(*a, **k)))
    dicts = load_dictionary_set("pythia-70m-deduped", model.adapter)
    assert ("pythia-70m-deduped-res-sm", "blocks.0.hook_resid_pre") in asked
    assert ("pythia-70m-deduped-att-sm", "blocks.1.hook_attn_out") in asked
    assert ("pythia-70m-deduped-mlp-sm", "blocks.0.hook_mlp_out") in asked
    assert len(asked) == len(model.adapter.sites()) and dicts.widths()["mlp_1"] == 24


def test_registry_is_package_data_and_local_sets_are_found(tiny, tmp_path, monkeypatch):
    """The registry ships inside the package; a registered local set is found in
    $FEATCIRCUITS_SAES before the source tree, and a clear UserError names both otherwise."""
    from featcircuits import dictionaries as D
    from featcircuits.dictionaries import load_dictionary_set, registry

    assert D.REGISTRY.is_file() and "featcircuits" in D.REGISTRY.parts and "starter" in registry()
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"mine": {"kind": "local", "path": "mine"}}))
    monkeypatch.setattr(D, "REGISTRY", reg)
    monkeypatch.setattr(D, "SOURCE_SAES", tmp_path / "source")
    monkeypatch.delenv(D.SAES_ENV, raising=False)
    with pytest.raises(UserError, match="FEATCIRCUITS_SAES"):
        load_dictionary_set("mine", tiny.adapter)
    random_saelens_set(tiny, tmp_path / "elsewhere" / "mine", width=8)
    monkeypatch.setenv(D.SAES_ENV, str(tmp_path / "elsewhere"))
    ds = load_dictionary_set("mine", tiny.adapter)
    assert ds.name == "mine" and ds.meta["path"] == str(tmp_path / "elsewhere" / "mine")


def test_digest_names_the_weights_not_the_folder(tiny, tmp_path):
    """One set loaded from two folders (a copy, a relative or absolute path) has one digest, so
    a report checked against it still matches; changing one weight changes it."""
    import shutil

    random_saelens_set(tiny, tmp_path / "a", width=8)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    d_a = load_dictionary_set(str(tmp_path / "a"), tiny.adapter).digest()
    assert load_dictionary_set(str(tmp_path / "b"), tiny.adapter).digest() == d_a
    sae = next((tmp_path / "b").rglob("*.safetensors"))
    weights = load_file(sae)
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, sae)
    assert load_dictionary_set(str(tmp_path / "b"), tiny.adapter).digest() != d_a
