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


def test_snapshot_of_an_unfinished_run_is_a_loadable_set_and_leaves_the_run(model, corpus, tmp_path):
    cfg = _cfg(sites=["embed", "mlp_0", "resid_1"], tokens=480, checkpoint_every=1)
    run, snap = tmp_path / "run", tmp_path / "snap"
    T.train_saes(model, corpus, run, cfg, max_steps=2, progress=False, log=lambda s: None)
    before = (run / T.CHECKPOINT).read_bytes()
    meta = T.snapshot_run(model, run, snap)
    assert (run / T.CHECKPOINT).read_bytes() == before and not (run / "set.json").exists()
    assert meta["complete"] is False and meta["forward"] == 2
    assert meta["tokens_trained"] == 2 * cfg.batch_size * (16 - 1)  # window 16, BOS skipped
    dset = load_dictionary_set(str(snap), model.adapter)
    assert not {"embed", "mlp_0", "resid_1"} & set(dset.meta.get("identity_sites", []))
    # the snapshot is the checkpoint's state, folded as a finished run saves it
    ckpt = torch.load(run / T.CHECKPOINT, weights_only=False)
    w = load_file(snap / "resid_1" / "sae_weights.safetensors")
    assert w["W_enc"].shape == ckpt["saes"]["resid_1"]["W_enc"].shape
    assert not torch.equal(w["W_enc"], torch.zeros_like(w["W_enc"]))
    with pytest.raises(UserError, match="no checkpoint.pt"):
        T.snapshot_run(model, snap, tmp_path / "again")


def test_user_errors(model, corpus, tmp_path):
    with pytest.raises(UserError, match="unknown site"):
        T.train_saes(model, corpus, tmp_path, _cfg(sites=["resid_9"]), progress=False)
    with pytest.raises(UserError, match="ask for fewer tokens"):
        T.train_saes(model, corpus, tmp_path, _cfg(tokens=10**7), progress=False)
    with pytest.raises(UserError, match="--k"):
        T.train_saes(model, corpus, tmp_path, _cfg(k=64), progress=False)


def test_train_saes_subcommand_trains_a_tiny_set(tiny_model_dir, tmp_path, capsys):
    from featcircuits.cli import main

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(d for docs in _docs().values() for d in docs))
    out = tmp_path / "set"
    args = ["train-saes", "--model", str(tiny_model_dir), "--sites", "embed,resid_1", "--width", "16", "--k", "4",
            "--tokens", "300", "--batch-size", "8", "--sae-batch", "60", "--window", "16", "--text", str(text),
            "--checkpoint-every", "1", "--eval-tokens", "60", "--seed", "3", "--no-progress",
            "--architecture", "batchtopk", "--dim-clip", "2", "--out", str(out)]
    assert main(args + ["--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "resid_1 " in printed and "dead median" in printed
    assert (out / T.CHECKPOINT).is_file() and not (out / "set.json").exists()
    assert main(args + ["--snapshot", str(tmp_path / "snap")]) == 0  # inspect midway: the run stays
    assert "at forward 1" in capsys.readouterr().out and (tmp_path / "snap" / "resid_1" / "cfg.json").is_file()
    assert (out / T.CHECKPOINT).is_file() and not (out / "set.json").exists()
    assert main(args) == 2  # an unfinished run is not overwritten without --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    meta = json.loads((out / "set.json").read_text())
    assert meta["config"]["seed"] == 3 and meta["architecture"] == "batchtopk" and meta["config"]["dim_clip"] == 2
    assert meta["corpus"]["train_sha256"] == meta["corpus_sha256"] and set(meta["sites"]) == {"embed", "resid_1"}
    from sae_lens import SAE

    assert SAE.load_from_disk(out / "resid_1").cfg.architecture() == "jumprelu"
    assert main(["train-saes", "--model", str(tiny_model_dir), "--out", str(out), "--text", "nope.txt"]) == 2


def test_train_saes_help_lists_the_recipe_flags(capsys):
    from featcircuits.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train-saes", "--help"])
    assert exc.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--resume", "--seed", "--architecture", "--dim-clip", "--resample-until", "--samples", "--text",
                 "--device", "--name-swaps", "--sample-batch"):
        assert flag in shown


@pytest.mark.parametrize("bad, word", [(["--samples", "4", "--sample-batch", "0"], "--sample-batch"),
                                       (["--name-swaps", "2"], "--name-swaps"),
                                       (["--sample-names"], "--sample-names")])
def test_train_saes_refuses_bad_sampling_flags_in_one_line(tiny_model_dir, tmp_path, capsys, bad, word):
    from featcircuits.cli import main

    assert main(["train-saes", "--model", str(tiny_model_dir), "--out", str(tmp_path / "set"), *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert word in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_train_saes_samples_with_the_batch_asked_for(tiny_model_dir, tmp_path, monkeypatch):
    """--sample-batch reaches the sampler (it is part of the sampling recipe and the cache's name)."""
    import featcircuits.training.samples as S
    from featcircuits.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake(hf, tokenizer, model_spec, n, **kw):
        seen.update(kw, n=n)
        raise Stop

    monkeypatch.setattr(S, "model_samples", fake)
    with pytest.raises(Stop):
        main(["train-saes", "--model", str(tiny_model_dir), "--out", str(tmp_path / "set"), "--samples", "8",
              "--sample-batch", "4"])
    assert seen["batch"] == 4 and seen["n"] == 8


def test_train_saes_pair_samples_open_with_two_names(tiny_model_dir, tmp_path, monkeypatch):
    """--pair-samples draws its own samples, opened by pair_openers, with the batch asked for."""
    import featcircuits.training.samples as S
    from featcircuits.cli import main

    calls = []

    class Stop(Exception):
        pass

    def fake(hf, tokenizer, model_spec, n, **kw):
        calls.append(dict(kw, n=n))
        if len(calls) == 2:
            raise Stop
        return [], {}

    monkeypatch.setattr(S, "model_samples", fake)
    with pytest.raises(Stop):
        main(["train-saes", "--model", str(tiny_model_dir), "--out", str(tmp_path / "set"), "--samples", "8",
              "--pair-samples", "6", "--sample-batch", "2", "--seed", "1"])
    assert calls[1]["n"] == 6 and calls[1]["batch"] == 2 and calls[1]["openers"] == S.pair_openers(1)
    assert calls[0]["openers"] != calls[1]["openers"]
    calls.clear()
    with pytest.raises(Stop):
        main(["train-saes", "--model", str(tiny_model_dir), "--out", str(tmp_path / "set2"), "--samples", "8",
              "--pair-samples", "6", "--sample-batch", "4", "--pair-sample-batch", "3"])
    assert calls[0]["batch"] == 4 and calls[1]["batch"] == 3


def test_corpus_of_set_rebuilds_both_kinds_of_model_samples(model, tmp_path, monkeypatch):
    """A set trained with --samples and --pair-samples: its corpus is rebuilt from set.json with
    both sample sources read from the cache (the same tokens), and a missing chunk of the pair
    samples is named as what keeps the cards off the set's text."""
    from featcircuits.text_corpus import set_corpus_problem
    from featcircuits.training import samples as S

    monkeypatch.setenv("FEATCIRCUITS_CACHE", str(tmp_path))
    monkeypatch.setattr(S, "english_prose", lambda text: text)  # a random model writes no English
    plain = {"stdlib": [f"An ordinary paragraph number {i} about rivers, boats and the weather." for i in range(40)]}
    monkeypatch.setattr(C, "texts", lambda log=None: {"sources": plain, "modules": {"stdlib": 1},
                                                      "versions": {"python": "x"}})
    kw = dict(new_tokens=6, batch=2, progress=False)
    samples = S.model_samples(model.hf, model.tokenizer, "tiny", 4, openers=S.opener_cycle(True), **kw)
    pairs = S.model_samples(model.hf, model.tokenizer, "tiny", 4, openers=S.pair_openers(), **kw)
    corpus = C.build_corpus(model.tokenizer, seed=0, window=16, eval_fraction=0.2, samples=samples, pair_samples=pairs)
    assert corpus.recipe["sources"]["model_pair_samples"] == 4 and corpus.recipe["model_pair_samples"]["chunks"] == 2
    meta = {"corpus": corpus.recipe, "corpus_sha256": corpus.recipe["train_sha256"], "config": {"seed": 0}}
    assert C.corpus_of_set(meta, model.tokenizer).recipe["train_sha256"] == meta["corpus_sha256"]
    assert set_corpus_problem(meta) is None
    (S.samples_folder(S.key_of_recipe(corpus.recipe["model_pair_samples"])) / "chunk-00001.json").unlink()
    assert "1 of the 2 chunks of its model pair samples" in set_corpus_problem(meta)


def test_collect_stops_after_the_last_site_and_records_what_a_full_forward_sees(model, corpus):
    from featcircuits.tracing import SplicedModel

    windows = corpus.train[:4]
    early = model.adapter.sites()[:3]  # embed .. resid_0: the forward stops in layer 0
    spliced = SplicedModel(model)
    full: dict[str, torch.Tensor] = {}

    def record(site, x):
        full[site.name] = x[:, 1:].reshape(-1, x.shape[-1]).float()

    with torch.no_grad():
        assert spliced.run({"input_ids": windows, "attention_mask": torch.ones_like(windows)}, record, early) is not None
    got = T.collect(model, windows, early)
    assert set(got) == {s.name for s in early}
    for name, x in got.items():
        assert torch.equal(x, full[name])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for one without")
@pytest.mark.parametrize("command", ["train-saes", "finetune-saes"])
def test_training_on_a_device_torch_cannot_see_is_one_line(command, tiny_model_dir, tmp_path, capsys):
    from featcircuits.cli import main

    extra = ["--saes", str(tmp_path), "--sites", "resid_0"] if command == "finetune-saes" else []
    assert main([command, "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--device", "cuda",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_folded_weights_on_raw_activations_equal_training_units(architecture):
    """The saved SAE on raw x computes exactly the training SAE on x / (scale * dims), rescaled."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    from featcircuits.adapters import Site
    from featcircuits.training import sae_step as S

    site = Site("resid_0", "resid", 0, "model.layers.0", True)
    sae = S.new_sae(site, 8, 12, 3, "m", 0, architecture)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen) * torch.tensor([50.0, 1, 1, 2, 1, 1, 1, 1]) + 3
    dims = S.dim_scales(x, 2.0)
    assert dims[0] > 10 and bool((dims >= 1).all()) and int((dims > 1).sum()) <= 2
    scale = 4.0
    z = x / (dims * scale)
    with torch.no_grad():
        sae.b_dec.copy_(z.mean(0))
        if architecture == "batchtopk":
            sae.encode(z)
            sae.topk_threshold.fill_(0.05)
    state = S.folded_state(sae, scale, dims)
    common = dict(d_in=8, d_sae=12, dtype="float32", device="cpu", apply_b_dec_to_input=True)
    if architecture == "topk":
        inf = TopKSAE(TopKSAEConfig(k=3, rescale_acts_by_decoder_norm=False, **common))
        want_f = sae.encode(z)
    else:
        inf = JumpReLUSAE(JumpReLUSAEConfig(**common))
        pre = (z - sae.b_dec) @ sae.W_enc + sae.b_enc
        want_f = pre.relu() * (pre > 0.05)
    inf.load_state_dict(state)
    with torch.no_grad():
        f = inf.encode(x)
        torch.testing.assert_close((f != 0), (want_f != 0))
        want_x = (want_f @ sae.W_dec + sae.b_dec) * dims * scale
        torch.testing.assert_close(inf.decode(f), want_x, rtol=1e-4, atol=1e-3)


def test_english_prose_filter():
    from featcircuits.training.samples import english_prose

    text = ("<p>The river was quiet in the evening, and the people of the town walked along it to see "
            "the boats that had come in from the sea.</p>")
    assert english_prose(text) == text[3:-4]
    assert english_prose("罗伯德说道：你，你放心。" * 10) is None
    assert english_prose("def f(x): return x + 1; y = [1, 2, 3] " * 5) is None
    assert english_prose("Short.") is None


def test_model_samples_are_chunked_seeded_and_resumable(model, tmp_path):
    from featcircuits.training.samples import model_samples

    kw = dict(new_tokens=6, batch=4, cache=tmp_path, progress=False)
    kept, rec = model_samples(model.hf, model.tokenizer, "tiny", 6, seed=0, **kw)
    assert rec["generated"] == 8 and rec["chunks"] == 2 and len(kept) == rec["kept"]
    folder = next(tmp_path.glob("samples-*"))
    (folder / "chunk-00001.json").unlink()  # a run killed before the second chunk
    again, rec2 = model_samples(model.hf, model.tokenizer, "tiny", 6, seed=0, **kw)
    assert rec2["raw_sha256"] == rec["raw_sha256"]
    _, other = model_samples(model.hf, model.tokenizer, "tiny", 6, seed=1, **kw)
    assert other["raw_sha256"] != rec["raw_sha256"]


def test_missing_chunks_come_from_a_shipped_archive(model, tmp_path, monkeypatch):
    """Samples shipped as saes/samples/<folder>.tar.xz are unpacked into the cache instead of
    being sampled again: only the recipe's chunk files, and only the missing ones."""
    import tarfile

    from featcircuits.training import samples as S

    kw = dict(new_tokens=6, batch=4, progress=False)
    _, made = S.model_samples(model.hf, model.tokenizer, "tiny", 8, seed=0, cache=tmp_path / "made", **kw)
    folder = next((tmp_path / "made").glob("samples-*"))
    (folder / "notes.txt").write_text("not a chunk")
    (tmp_path / "saes" / "samples").mkdir(parents=True)
    with tarfile.open(tmp_path / "saes" / "samples" / f"{folder.name}.tar.xz", "w:xz") as tar:
        tar.add(folder, arcname=folder.name)
    monkeypatch.setenv("FEATCIRCUITS_SAES", str(tmp_path / "saes"))

    def no_generation(*a, **k):
        raise AssertionError("sampled what the archive ships")

    monkeypatch.setattr(S, "_sample", no_generation)
    _, again = S.model_samples(model.hf, model.tokenizer, "tiny", 8, seed=0, cache=tmp_path / "fresh", **kw)
    assert again["raw_sha256"] == made["raw_sha256"]
    unpacked = tmp_path / "fresh" / folder.name
    assert sorted(p.name for p in unpacked.iterdir()) == ["chunk-00000.json", "chunk-00001.json"]
    key = S.samples_key("tiny", 3, 4, 6, 0, 1.0, 50)
    assert S.missing_chunks(key, tmp_path / "fresh") == [2]  # the archive holds two chunks of three


def test_pair_openers_name_two_different_people_and_no_task_prompt():
    from featcircuits.tasks import BUILTIN_TASKS, make_pairs
    from featcircuits.training.samples import NAME_OPENERS, pair_openers

    ops = pair_openers()
    assert ops == pair_openers() and ops != pair_openers(1) and len(set(ops)) == len(NAME_OPENERS)
    for o in ops:
        a, b = o.split(" and ")
        assert a != b and a in NAME_OPENERS and b in NAME_OPENERS
    prompts = [p.clean_prefix for t in BUILTIN_TASKS for p in make_pairs(t, 20, 0)]
    assert not any(pr.startswith(o) for o in ops for pr in prompts)  # a sample never opens like a task prompt


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


def test_task_prompts_are_dropped_from_the_training_text():
    from featcircuits.tasks import make_pairs

    prompt = make_pairs("ioi", 1, 0)[0].clean_prefix
    docs = ["An ordinary paragraph about rivers and boats.", f"Before. {prompt} after.", "The author wrote."]
    checked, kept, dropped = C.drop_task_prompts(docs)
    assert checked > 100 and dropped == 1 and kept == [docs[0], docs[2]]


def test_opener_cycle_alternates_words_and_given_names():
    from featcircuits.training.samples import NAME_OPENERS, OPENERS, opener_cycle

    assert opener_cycle(False) == OPENERS
    mixed = opener_cycle(True)
    assert mixed[0::2][:len(OPENERS)] == OPENERS and mixed[1::2] == NAME_OPENERS
    assert set(mixed) == set(OPENERS) | set(NAME_OPENERS) and len(set(NAME_OPENERS)) == len(NAME_OPENERS)


def test_model_samples_open_with_the_openers_asked_for(model, tmp_path):
    from featcircuits.training.samples import model_samples

    kw = dict(new_tokens=4, batch=4, cache=tmp_path, progress=False)
    _, words = model_samples(model.hf, model.tokenizer, "tiny", 4, seed=0, **kw)
    _, names = model_samples(model.hf, model.tokenizer, "tiny", 4, seed=0, openers=("Mary", "John"), **kw)
    assert names["openers"] == ["Mary", "John"] and names["raw_sha256"] != words["raw_sha256"]
    folders = sorted(tmp_path.glob("samples-*"))
    assert len(folders) == 2  # other openers, another cache folder: no chunk is reused across recipes
    raw = [json.loads(f.read_text()) for d in folders for f in d.glob("chunk-*.json")]
    assert any([t[:4] for t in r] == ["Mary", "John", "Mary", "John"] for r in raw)


def test_docstring_cap_thins_sources_but_keeps_every_model_sample(model):
    docs = {"docstrings": [f"Return the value number {i} of the table, with its unit." for i in range(200)]}
    samples = ([f"Mary wrote letter {i} to her brother, who lived by the sea." for i in range(30)], {"kept": 30})
    kw = dict(docs=docs, samples=samples, window=16, cache=False, eval_fraction=0.0)
    full = C.build_corpus(model.tokenizer, **kw)
    capped = C.build_corpus(model.tokenizer, max_chars_per_source=600, **kw)
    mary, table = (model.tokenizer.encode(w, add_special_tokens=False)[-1] for w in (" Mary", " table"))
    assert (capped.train == mary).sum() >= 29  # the stream's cut-off tail may drop the last sample
    assert (capped.train == table).sum() <= 12 < (full.train == table).sum()


def test_swap_names_replaces_each_name_consistently_within_its_half():
    from featcircuits.training.samples import NAME_OPENERS, swap_names

    doc = "Mary met John at the station. Later Mary wrote to John, and Marylebone stayed quiet."
    copies = swap_names(doc, 5, seed=0)
    assert len(copies) == 5 and copies == swap_names(doc, 5, seed=0) and copies != swap_names(doc, 5, seed=1)
    female, male = set(NAME_OPENERS[:59]), set(NAME_OPENERS[59:])
    for c in copies:
        words = c.replace(",", " ").replace(".", " ").split()
        a, b = words[0], words[2]  # the names that replaced Mary and John
        assert a in female - {"Mary"} and b in male - {"John"}
        assert c == doc.replace("Marylebone", "@").replace("Mary", a).replace("John", b).replace("@", "Marylebone")
    assert swap_names("The river rose in spring.", 3, seed=0) == []


def test_held_out_names_are_outside_the_task_and_the_samples_lists():
    from featcircuits.tasks import HELD_OUT_NAMES, NAMES, ioi_pairs
    from featcircuits.training.samples import NAME_OPENERS

    assert len(set(HELD_OUT_NAMES)) == 16 and not set(HELD_OUT_NAMES) & (set(NAMES) | set(NAME_OPENERS))
    pairs = ioi_pairs(HELD_OUT_NAMES, 40, seed=1)
    used = {p.clean_answer.strip() for p in pairs} | {p.patch_answer.strip() for p in pairs}
    assert used <= set(HELD_OUT_NAMES) and len(used) > 8 and pairs == ioi_pairs(HELD_OUT_NAMES, 40, seed=1)
    with pytest.raises(UserError):
        ioi_pairs(["Leo", "Leo"], 4)


def test_name_swaps_add_copies_on_the_samples_side_of_the_split(model):
    docs = {"docstrings": [f"Return the value number {i} of the table, with its unit." for i in range(20)]}
    samples = ([f"Mary wrote letter {i} to her brother, who lived by the sea." for i in range(30)]
               + ["The sea was calm that morning and the boats went out early."], {"kept": 31})
    kw = dict(docs=docs, samples=samples, window=16, cache=False, eval_fraction=0.0)
    plain, swapped = C.build_corpus(model.tokenizer, **kw), C.build_corpus(model.tokenizer, name_swaps=3, **kw)
    assert "name_swaps" not in plain.recipe  # a recipe without swaps is the recipe it always was
    assert swapped.recipe["name_swaps"] == 3 and swapped.recipe["name_swapped_samples"] == 30
    mary = model.tokenizer.encode("Mary", add_special_tokens=False)[-1]
    # each sample once as written plus three copies in which Mary is someone else
    assert (swapped.train == mary).sum() == (plain.train == mary).sum()
    assert swapped.train.numel() > 3 * plain.train.numel() // 2
    with pytest.raises(UserError):
        C.build_corpus(model.tokenizer, docs=docs, window=16, cache=False, name_swaps=2)


def test_corpus_of_set_rebuilds_the_recorded_recipe(model, tmp_path, monkeypatch):
    """A set's corpus is rebuilt from its set.json alone: the docstring cap, seed and the
    samples' openers all come from the recipe (scripts/sae_report.py and task_token_coverage.py)."""
    from featcircuits.training.samples import model_samples

    monkeypatch.setenv("FEATCIRCUITS_CACHE", str(tmp_path))
    docs = {"docstrings": [f"Return the value number {i} of the table, with its unit." for i in range(200)]}
    monkeypatch.setattr(C, "texts", lambda log=None: {"sources": docs, "modules": {}, "versions": {}})
    samples = model_samples(model.hf, model.tokenizer, "tiny", 4, seed=0, new_tokens=4, batch=4, progress=False,
                            openers=("Mary", "John"))
    built = C.build_corpus(model.tokenizer, seed=2, samples=samples, window=16, max_chars_per_source=900)
    meta = {"corpus": built.recipe, "config": {"seed": 2}, "corpus_sha256": built.recipe["train_sha256"]}
    again = C.corpus_of_set(json.loads(json.dumps(meta)), model.tokenizer)  # from the cache: no model needed
    assert again.recipe["train_sha256"] == meta["corpus_sha256"] and torch.equal(again.eval, built.eval)
    meta["corpus"]["max_chars_per_source"] = 10**6
    assert C.corpus_of_set(meta, model.tokenizer).recipe["train_sha256"] != meta["corpus_sha256"]


def test_identity_coef_cuts_the_error_along_each_tokens_own_embedding(model, corpus, tmp_path):
    """--identity-coef: the saved SAE's error along the token's own input-embedding direction
    (raw units, where downstream heads read which token is here) falls against the same run
    without it."""
    from featcircuits.dictionaries import load_dictionary

    site = model.adapter.site("resid_1")
    emb = model.hf.get_input_embeddings().weight.detach().float()
    windows = corpus.train[:16]
    x = T.collect(model, windows, [site])["resid_1"]
    u = torch.nn.functional.normalize(emb[windows[:, 1:].reshape(-1)], dim=-1)

    def along(coef: float) -> float:
        out = tmp_path / f"c{coef}"
        T.train_saes(model, corpus, out, _cfg(sites=["resid_1"], identity_coef=coef, tokens=1200, eval_tokens=0),
                     progress=False, log=lambda s: None)
        d = load_dictionary(out / "resid_1")
        with torch.no_grad():
            err = x - d.decode(d.encode(x)).float()
        return float(((err * u).sum(-1)).pow(2).mean())

    assert along(30.0) < 0.8 * along(0.0)  # measured 0.63x on this tiny set
    with pytest.raises(UserError, match="--identity-coef"):
        T.train_saes(model, corpus, tmp_path / "bad", _cfg(identity_coef=-1.0), progress=False)
