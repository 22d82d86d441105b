"""The SAE trainer and its corpus, on a tiny random Gemma 3 and a few dozen sentences."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featcircuits.dictionaries import load_dictionary_set
from featcircuits.errors import UserError
from featcircuits.tasks import make_pairs
from featcircuits.testing import tiny_model
from featcircuits.training import corpus as C
from featcircuits.training import trainer as T


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3")


def _docs() -> dict[str, list[str]]:
    pairs = make_pairs("sva-nounpp", 120, 0) + make_pairs("ioi", 60, 0)
    return {"tiny": [p.clean_prefix + p.clean_answer for p in pairs]}


@pytest.fixture(scope="module")
def corpus(model):
    return C.build_corpus(model.tokenizer, docs=_docs(), window=16, eval_fraction=0.1, cache=False)


def _cfg(**kw) -> T.TrainConfig:
    base = dict(sites=["all"], width=16, attn_width=12, k=4, tokens=600, batch_size=8, sae_batch=60,
                dead_tokens=200, checkpoint_every=2, eval_tokens=120, save_dtype="float32")
    return T.TrainConfig(**{**base, **kw})


def test_corpus_windows_start_with_bos_and_hash_is_seeded(model, corpus):
    bos = model.tokenizer.bos_token_id
    assert corpus.train.shape[1] == 16 and bool((corpus.train[:, 0] == bos).all())
    assert corpus.eval.shape[0] > 0 and bool((corpus.eval[:, 0] == bos).all())
    again = C.build_corpus(model.tokenizer, docs=_docs(), window=16, eval_fraction=0.1, cache=False)
    other = C.build_corpus(model.tokenizer, docs=_docs(), window=16, eval_fraction=0.1, seed=1, cache=False)
    assert again.recipe["train_sha256"] == corpus.recipe["train_sha256"] == C.token_hash(corpus.train)
    assert other.recipe["train_sha256"] != corpus.recipe["train_sha256"]
    # The held-out split is chosen by document content, so it does not depend on the seed.
    assert other.recipe["eval_windows"] == corpus.recipe["eval_windows"]


def test_collector_skips_tests_and_side_effect_modules():
    assert C._skip("json.tests") and C._skip("torch.testing._internal") and C._skip("this")
    assert C._skip("antigravity") and C._skip("idlelib.editor") and C._skip("test.support")
    assert not C._skip("json.decoder") and not C._skip("torch.nn.functional")


def test_windows_from_texts_rejects_too_little_text(model):
    with pytest.raises(UserError, match="fewer than one"):
        C.windows_from_texts(["The"], model.tokenizer, window=16)


def test_train_tiny_set_end_to_end_and_reload(model, corpus, tmp_path):
    meta = T.train_saes(model, corpus, tmp_path, _cfg(), progress=False, log=lambda s: None)
    names = [s.name for s in model.adapter.sites()]
    assert meta["complete"] and set(meta["sites"]) == set(names)
    for m in meta["sites"].values():
        assert m["l0"] <= 4 + 1e-9 and 0 <= m["dead_frac"] <= 1 and m["fve"] == m["fve"]
    assert not (tmp_path / T.CHECKPOINT).exists()  # finished: no stale checkpoint left behind
    assert not list(tmp_path.glob(".*"))  # no temp files
    saved = json.loads((tmp_path / "set.json").read_text())
    assert saved["corpus_sha256"] == corpus.recipe["train_sha256"] and saved["wall_s"] >= 0

    ds = load_dictionary_set(str(tmp_path), model.adapter)
    assert ds.meta["identity_sites"] == []
    assert ds.widths() == {n: (12 if n.startswith("attn") else 16) for n in names}
    from sae_lens import SAE

    sae = SAE.load_from_disk(tmp_path / "resid_1")
    assert sae.cfg.architecture() == "topk" and sae.cfg.k == 4

    # The saved SAE reads raw activations (the training scale is folded in): its held-out
    # FVE recomputed from the loaded dictionaries matches the one the trainer recorded.
    sites = model.adapter.sites()
    again = T.evaluate(model, {n: ds[n] for n in names}, corpus.eval, sites)
    for n in names:
        assert again[n]["fve"] == pytest.approx(meta["sites"][n]["fve"], abs=1e-4)
        assert again[n]["fve"] > 0.0  # learned something, not a broken scale


def test_bf16_weights_on_disk(model, corpus, tmp_path):
    T.train_saes(model, corpus, tmp_path, _cfg(sites=["resid_0"], save_dtype="bfloat16", tokens=120),
                 progress=False, log=lambda s: None)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["resid_0"]
    weights = load_file(tmp_path / "resid_0" / "sae_weights.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    ds = load_dictionary_set(str(tmp_path), model.adapter)
    assert "resid_0" not in ds.meta["identity_sites"] and "embed" in ds.meta["identity_sites"]


def test_resume_after_kill_equals_uninterrupted_run(model, corpus, tmp_path):
    cfg = _cfg(sites=["embed", "mlp_0", "resid_1"], tokens=480, checkpoint_every=1)
    T.train_saes(model, corpus, tmp_path / "a", cfg, progress=False, log=lambda s: None)

    out = tmp_path / "b"
    part = T.train_saes(model, corpus, out, cfg, max_steps=2, progress=False, log=lambda s: None)
    assert part["complete"] is False and (out / T.CHECKPOINT).is_file()
    assert not (out / "embed").exists()  # nothing final is written before the end
    with pytest.raises(UserError, match="--resume"):
        T.train_saes(model, corpus, out, cfg, progress=False, log=lambda s: None)
    with pytest.raises(UserError, match="other settings"):
        T.train_saes(model, corpus, out, _cfg(sites=["embed", "mlp_0", "resid_1"], tokens=480, lr=1e-3,
                                             checkpoint_every=1), resume=True, progress=False)
    T.train_saes(model, corpus, out, cfg, resume=True, progress=False, log=lambda s: None)
    for site in ("embed", "mlp_0", "resid_1"):
        a = load_file(tmp_path / "a" / site / "sae_weights.safetensors")
        b = load_file(out / site / "sae_weights.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


def test_user_errors(model, corpus, tmp_path):
    with pytest.raises(UserError, match="unknown site"):
        T.train_saes(model, corpus, tmp_path, _cfg(sites=["resid_9"]), progress=False)
    with pytest.raises(UserError, match="ask for fewer tokens"):
        T.train_saes(model, corpus, tmp_path, _cfg(tokens=10**7), progress=False)
    with pytest.raises(UserError, match="--k"):
        T.train_saes(model, corpus, tmp_path, _cfg(k=64), progress=False)


def test_cli_parser_registers_train_saes():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    T.add_train_saes_parser(sub)
    args = parser.parse_args(["train-saes", "--model", "m", "--sites", "resid_0,mlp_0", "--width", "64",
                              "--k", "8", "--tokens", "1000", "--out", "o", "--seed", "3",
                              "--batch-size", "4", "--lr", "0.01", "--resume"])
    assert args.func is T.train_saes_main and args.resume and args.width == 64 and args.seed == 3
    assert args.sites == "resid_0,mlp_0" and args.batch_size == 4 and args.lr == 0.01


def test_corpus_from_windows_holds_out_the_tail():
    w = torch.arange(40).view(10, 4)
    c = C.corpus_from_windows(w, eval_fraction=0.2)
    assert c.train.shape == (8, 4) and torch.equal(c.eval, w[8:])
    with pytest.raises(UserError):
        C.corpus_from_windows(torch.arange(4).view(1, 4))


def test_resolve_sites_keeps_forward_order(model):
    got = [s.name for s in T.resolve_sites(model.adapter, "resid_1,embed,attn_0")]
    assert got == ["embed", "attn_0", "resid_1"]
    assert Path(T.__file__).name == "trainer.py"
