"""End-to-end KL fine-tuning of a trained set (featcircuits.training.finetune), on a tiny random Gemma 3."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from featcircuits.dictionaries import load_dictionary, load_dictionary_set
from featcircuits.errors import UserError
from featcircuits.tasks import make_pairs
from featcircuits.testing import tiny_model
from featcircuits.tracing import SplicedModel
from featcircuits.training import corpus as C
from featcircuits.training import finetune as F
from featcircuits.training import trainer as T


def _docs() -> dict[str, list[str]]:
    pairs = make_pairs("sva-nounpp", 120, 0) + make_pairs("ioi", 60, 0)
    return {"tiny": [p.clean_prefix + p.clean_answer for p in pairs]}


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def corpus(model):
    return C.build_corpus(model.tokenizer, docs=_docs(), window=16, eval_fraction=0.1, cache=False)


@pytest.fixture(scope="module")
def base(model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    cfg = T.TrainConfig(sites=["embed", "resid_0", "resid_1"], width=16, attn_width=12, k=4, tokens=600, batch_size=8,
                        sae_batch=60, dead_tokens=200, checkpoint_every=5, eval_tokens=0, save_dtype="float32")
    T.train_saes(model, corpus, out, cfg, progress=False, log=lambda s: None)
    return out


def _cfg(**kw) -> F.FinetuneConfig:
    return F.FinetuneConfig(**{**dict(sites=["resid_1"], tokens=300, batch_size=4, lr=1e-2, kl_positions=4,
                                      checkpoint_every=1, eval_tokens=60), **kw})


def test_finetune_writes_a_whole_set_with_its_recipe(model, corpus, base, tmp_path):
    out = tmp_path / "ft"
    meta = F.finetune_set(model, str(base), corpus, out, _cfg(), progress=False, log=lambda s: None)
    assert meta["complete"] and meta["finetune"]["base"] == str(base)
    assert meta["finetune"]["config"]["sites"] == ["resid_1"] and meta["sites"]["resid_1"]["finetuned"]
    assert meta["config"] == json.loads((base / "set.json").read_text())["config"]  # the base recipe stays on record
    for site in ("embed", "resid_0"):  # untouched sites are copied as they were
        assert (out / site / "sae_weights.safetensors").read_bytes() == (base / site / "sae_weights.safetensors").read_bytes()
    a, b = load_file(base / "resid_1" / "sae_weights.safetensors"), load_file(out / "resid_1" / "sae_weights.safetensors")
    assert not torch.equal(a["W_enc"], b["W_enc"]) and a["W_enc"].shape == b["W_enc"].shape
    dset = load_dictionary_set(str(out), model.adapter)
    assert not {"embed", "resid_0", "resid_1"} & set(dset.meta.get("identity_sites", []))
    assert not (out / T.CHECKPOINT).exists()


def test_finetune_lowers_the_kl_of_the_spliced_model(model, base):
    """On a corpus of one repeated batch the trained objective must fall: KL(clean || spliced) at
    every position, measured before and after with the same function the loop uses."""
    spliced = SplicedModel(model)
    site = model.adapter.site("resid_1")
    windows = C.build_corpus(model.tokenizer, docs=_docs(), window=16, eval_fraction=0.1, cache=False).train[:4]
    one = C.corpus_from_windows(windows.repeat(24, 1), eval_fraction=0.1)
    positions = torch.arange(1, 16)

    def kl(sae) -> float:
        with torch.no_grad():
            clean = torch.log_softmax(spliced.run({"input_ids": windows, "attention_mask": torch.ones_like(windows)},
                                                  positions=positions).float(), -1)
            return F.splice_loss(spliced, sae, site, windows, positions, clean, 0.0)[1]["kl"]

    before = kl(load_dictionary(base / "resid_1").sae)
    F.finetune_set(model, str(base), one, base.parent / "ft_kl", _cfg(tokens=1200, lr=3e-2, mse_coef=0.0, kl_positions=15,
                                                                        eval_tokens=0), progress=False, log=lambda s: None)
    after = kl(load_dictionary(base.parent / "ft_kl" / "resid_1").sae)
    assert before > 0 and after < 0.8 * before


def test_finetune_resume_after_kill_equals_uninterrupted_run(model, corpus, base, tmp_path):
    F.finetune_set(model, str(base), corpus, tmp_path / "a", _cfg(), progress=False, log=lambda s: None)
    out = tmp_path / "b"
    part = F.finetune_set(model, str(base), corpus, out, _cfg(), max_steps=2, progress=False, log=lambda s: None)
    assert part["complete"] is False and (out / T.CHECKPOINT).is_file() and not (out / "set.json").exists()
    with pytest.raises(UserError, match="--resume"):
        F.finetune_set(model, str(base), corpus, out, _cfg(), progress=False, log=lambda s: None)
    with pytest.raises(UserError, match="other settings"):
        F.finetune_set(model, str(base), corpus, out, _cfg(lr=1e-3), resume=True, progress=False, log=lambda s: None)
    F.finetune_set(model, str(base), corpus, out, _cfg(), resume=True, progress=False, log=lambda s: None)
    a, b = load_file(tmp_path / "a" / "resid_1" / "sae_weights.safetensors"), load_file(out / "resid_1" / "sae_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


def test_copy_positions_are_repeats_of_uncommon_tokens():
    # BOS=1; position i is a copy position when token i+1 is uncommon and occurs at 1..i
    w = torch.tensor([[1, 5, 7, 5, 9, 7, 3, 3]])
    common = torch.zeros(10, dtype=torch.bool)
    common[3] = True  # a common token repeating is no copy
    got = F.copy_positions(w, common)
    assert got.tolist() == [[False, False, True, False, True, False, False, False]]  # predicting 5 at 3, 7 at 5
    assert F.common_tokens(torch.tensor([[1, 3, 3, 3, 4]]), 6).tolist() == [False, False, False, True, True, False]


def test_choose_positions_puts_each_windows_copies_first():
    w = torch.tensor([[1, 5, 7, 5, 9, 7, 2, 4, 6, 8], [1, 2, 2, 4, 6, 6, 8, 9, 9, 0]])
    common = torch.zeros(10, dtype=torch.bool)
    copies = F.copy_positions(w, common)
    positions, weights = F.choose_positions(w, 3, "copies", torch.Generator().manual_seed(0), common)
    assert weights.shape == (2, len(positions)) and weights.sum(1).tolist() == [3.0, 3.0]
    assert 0 not in positions.tolist() and positions.tolist() == sorted(positions.tolist())
    for b in range(2):
        mine = set(positions[weights[b].bool()].tolist())
        assert set(torch.nonzero(copies[b]).flatten().tolist()) <= mine  # 2 copies each, both kept
    positions, weights = F.choose_positions(w, 3, "random", torch.Generator().manual_seed(0))
    assert len(positions) == 3 and bool((weights == 1).all()) and 0 not in positions.tolist()


def test_finetune_with_copy_focus_trains_and_records_it(model, corpus, base, tmp_path):
    meta = F.finetune_set(model, str(base), corpus, tmp_path / "c", _cfg(kl_focus="copies", kl_positions=3),
                          progress=False, log=lambda s: None)
    assert meta["finetune"]["config"]["kl_focus"] == "copies"
    kl = [h[0] for h in meta["finetune"]["loss_end"].values()]
    assert all(v == v and v >= 0 for v in kl)  # a finite, non-negative KL was trained


def test_finetune_user_errors(model, corpus, base, tmp_path):
    with pytest.raises(UserError, match="kl-focus"):
        F.finetune_set(model, str(base), corpus, tmp_path / "x", _cfg(kl_focus="names"), progress=False)
    with pytest.raises(UserError, match="kl-positions"):
        F.finetune_set(model, str(base), corpus, tmp_path / "x", _cfg(kl_positions=16), progress=False)
    with pytest.raises(UserError, match="unknown site"):
        F.finetune_set(model, str(base), corpus, tmp_path / "x", _cfg(sites=["resid_9"]), progress=False)
    with pytest.raises(UserError, match="fewer tokens"):
        F.finetune_set(model, str(base), corpus, tmp_path / "x", _cfg(tokens=10**7), progress=False)
    with pytest.raises(UserError, match="set.json"):
        F.finetune_set(model, "identity", corpus, tmp_path / "x", _cfg(), progress=False)


def test_finetune_saes_subcommand(tiny_model_dir, tmp_path, capsys):
    from featcircuits.cli import main

    model = tiny_model("gemma3")  # the same weights as tiny_model_dir
    corpus = C.build_corpus(model.tokenizer, docs=_docs(), window=16, eval_fraction=0.1, cache=False)
    base = tmp_path / "base"
    T.train_saes(model, corpus, base, T.TrainConfig(sites=["resid_1"], width=16, k=4, tokens=300, batch_size=8,
                                                    sae_batch=60, eval_tokens=0, save_dtype="float32"),
                 progress=False, log=lambda s: None)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(d for docs in _docs().values() for d in docs))
    out = tmp_path / "ft"
    args = ["finetune-saes", "--model", str(tiny_model_dir), "--saes", str(base), "--sites", "resid_1",
            "--tokens", "120", "--batch-size", "4", "--kl-positions", "4", "--kl-focus", "copies", "--window", "16", "--text", str(text),
            "--checkpoint-every", "1", "--eval-tokens", "60", "--no-progress", "--out", str(out)]
    assert main(args + ["--max-steps", "1"]) == 0
    assert "step 1/" in capsys.readouterr().out and (out / T.CHECKPOINT).is_file()
    assert main(args + ["--resume"]) == 0
    meta = json.loads((out / "set.json").read_text())
    assert meta["complete"] and meta["finetune"]["tokens_per_site"] >= 120 and meta["finetune"]["config"]["kl_focus"] == "copies"
    assert main(["finetune-saes", "--model", str(tiny_model_dir), "--saes", "identity", "--sites", "resid_1",
                 "--out", str(tmp_path / "y"), "--text", str(text)]) == 2
