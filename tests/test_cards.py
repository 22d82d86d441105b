"""Feature store: the streamed statistics against a dense brute force, direct effects,
caching, resuming, the subset mode, and labels."""

from __future__ import annotations

import json
import random

import pytest
import torch

from featcircuits import cards
from featcircuits.cards import StoreSettings, circuit_features, feature_store, stream
from featcircuits.text_corpus import corpus_windows
from featcircuits.dictionaries import load_dictionary_set
from featcircuits.direct_effect import decoder_directions, final_norm, norm_gain
from featcircuits.errors import UserError
from featcircuits.tasks import task_vocabulary
from featcircuits.testing import random_saelens_set, tiny_model
from featcircuits.tracing import SplicedModel

SETTINGS = StoreSettings(tokens=1200, top_k=5, samples=6, before=3, after=2, batch=3, checkpoint_every=1)


def tiny_spliced(tmp, width: int, n_docs: int):
    """A tiny random Gemma 3 with random sae-lens dictionaries and a random-word .txt corpus."""
    model = tiny_model("gemma3")
    random_saelens_set(model, tmp / "set", width=width)
    sm = SplicedModel(model, load_dictionary_set(str(tmp / "set"), model.adapter))
    rng = random.Random(0)
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(task_vocabulary()) for _ in range(50)) for _ in range(n_docs)))
    return sm, corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards")
    sm, corpus = tiny_spliced(tmp, 24, 40)
    store = feature_store(sm, str(corpus), SETTINGS, cache=tmp / "cache", progress=False)
    return sm, corpus, store, tmp


def _dense(sm, windows, site):
    """Every window's features at ``site`` [n, T, d] from the plain cache pass."""
    out = []
    for i in range(0, len(windows), 4):
        batch = windows[i:i + 4]
        _, values = sm.cache({"input_ids": batch, "attention_mask": torch.ones_like(batch)})
        out.append(values[site].f)
    return torch.cat(out)


def test_store_matches_dense_brute_force(setup):
    sm, corpus, store, _ = setup
    windows = store.tensors["windows"].long()
    site = "resid_1"
    f = _dense(sm, windows, site)[:, 1:]  # BOS left out, as the store does
    for feat in (0, 7, 23):
        card = store.card(site, feat)
        per_window = f[..., feat].max(1).values
        want = per_window[per_window > 0].sort(descending=True).values[:SETTINGS.top_k]
        got = torch.tensor([e["value"] for e in card["top"]])
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        assert card["density"] == pytest.approx(float((f[..., feat] > 0).float().mean()), abs=1e-6)
        assert card["mean"] == pytest.approx(float(f[..., feat].mean()), rel=1e-4, abs=1e-6)
        for e in card["top"]:
            # the context's peak token is the window's token at the peak, with the peak value
            assert e["acts"][e["peak"]] == pytest.approx(e["value"], rel=1e-2)
            assert e["tokens"][e["peak"]] == sm.model.tokenizer.decode([int(windows[e["window"], e["position"]])])
            assert len(e["tokens"]) == len(e["acts"]) <= SETTINGS.before + 1 + SETTINGS.after
        # lower-quantile examples are real active windows, ordered by activation
        vals = [e["value"] for e in card["quantiles"]]
        assert vals == sorted(vals) and all(v > 0 for v in vals)
        assert all(per_window[e["window"]] == pytest.approx(e["value"], rel=1e-3) for e in card["quantiles"])


def test_direct_effect_is_unembedding_of_gained_decoder(setup):
    sm, _, store, _ = setup
    norm = final_norm(sm.model)
    g = norm_gain(norm, sm.model.d_model)
    torch.testing.assert_close(g, 1.0 + norm.weight.float())  # Gemma's RMSNorm scales by (1 + weight)
    d = sm.dictionary("mlp_0")
    logits = (decoder_directions(d, torch.arange(d.d_sae)) * g) @ sm.model.hf.get_output_embeddings().weight.T
    card = store.card("mlp_0", 5)
    top = logits[5].topk(SETTINGS.logit_k)
    assert [t["token"] for t in card["promoted"]] == [sm.model.tokenizer.decode([i]) for i in top.indices.tolist()]
    assert card["suppressed"][0]["value"] == pytest.approx(float(logits[5].min()), rel=1e-4)


def test_norm_gain_plain_rmsnorm():
    model = tiny_model("llama")
    norm = final_norm(model)
    torch.testing.assert_close(norm_gain(norm, model.d_model), norm.weight.float())


def _refuse(*a, **k):
    raise RuntimeError("recomputed a cached store")


def test_store_is_cached_and_reused(setup, monkeypatch):
    sm, corpus, store, tmp = setup
    monkeypatch.setattr(cards, "stream", _refuse)
    again = feature_store(sm, str(corpus), SETTINGS, cache=tmp / "cache", progress=False)
    assert again.folder == store.folder
    assert again.card("resid_0", 3) == store.card("resid_0", 3)
    other = StoreSettings(**{**SETTINGS.key_dict(), "seed": 1})
    assert cards.cached_store(sm, str(corpus), SETTINGS, cache=tmp / "cache").folder == store.folder
    assert cards.cached_store(sm, str(corpus), other, cache=tmp / "cache") is None
    with pytest.raises(RuntimeError, match="recomputed"):
        feature_store(sm, str(corpus), other, cache=tmp / "cache", progress=False)


def test_resume_after_a_crash_gives_the_same_state(setup, tmp_path):
    sm, corpus, _, _ = setup
    windows, _ = corpus_windows(str(corpus), sm.model.tokenizer, SETTINGS.tokens)
    full = stream(sm, windows, SETTINGS, progress=False)
    real_run, calls = sm.run, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(*a, **k)

    sm.run = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            stream(sm, windows, SETTINGS, checkpoint_dir=tmp_path, progress=False)
    finally:
        del sm.run
    assert (tmp_path / ".checkpoint" / "features.pt").is_file()
    resumed = stream(sm, windows, SETTINGS, checkpoint_dir=tmp_path, progress=False)
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], msg=k)


def test_subset_mode_matches_full_store(setup):
    sm, corpus, store, tmp = setup
    feats = circuit_features(["resid_1/7", "resid_1/3@4", "mlp_0/err", "metric", "embed/2"])
    assert feats == {"resid_1": [3, 7], "embed": [2]}
    sub = feature_store(sm, str(corpus), SETTINGS, features=feats, cache=tmp / "cache", progress=False)
    assert sub.meta["subset"] and sub.meta["sites"] == ["embed", "resid_1"]
    assert sub.card("resid_1", 7) == store.card("resid_1", 7)
    assert sub.card("resid_1", 8) is None
    got = sub.cards_for_nodes(["resid_1/7@2", "resid_1/err", "metric"])
    assert list(got) == ["resid_1/7@2"]


def test_jsonl_corpus_and_bad_corpora(setup, tmp_path):
    sm = setup[0]
    tok = sm.model.tokenizer
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": "the keys to the cabinet are here " * 20}) for _ in range(5)))
    windows, desc = corpus_windows(str(path), tok, 300)
    assert windows.shape[0] * windows.shape[1] >= 300 and desc["tokens"] == windows.numel()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        corpus_windows(str(bad), tok, 10)
    with pytest.raises(UserError, match="--corpus"):
        corpus_windows(str(tmp_path / "missing.csv"), tok, 10)
    with pytest.raises(UserError, match="fewer than"):
        corpus_windows(str(path), tok, 10**7)


# --------------------------------------------------------------------------- labels

from featcircuits.labels import (auto_label, label_nodes, load_annotations, neuronpedia_url,  # noqa: E402
                                 source_neuronpedia_url)


def test_corpus_auto_uses_the_sets_text_only_where_it_can_be_rebuilt(setup, tmp_path, monkeypatch):
    """``auto`` falls back to the offline corpus, and ``set`` refuses, for a set whose text
    cannot be rebuilt here; the reason is said. The shipped starter's text can be rebuilt
    from its set.json and the shipped samples archive, with an empty cache."""
    from featcircuits.dictionaries import local_set_folder, registry
    from featcircuits.text_corpus import check_corpus, resolve_corpus, set_corpus_problem

    for spec in ("auto", "set", "offline"):
        check_corpus(spec)
    sm = setup[0]
    assert resolve_corpus("auto", sm.dictionaries.meta.get("set")) == "offline"  # a set with no set.json
    with pytest.raises(UserError, match="records no training corpus"):
        resolve_corpus("set", sm.dictionaries.meta.get("set"))
    with pytest.raises(UserError, match="--text"):
        resolve_corpus("set", {"corpus": {"modules": {}, "sources": {"text": 3}}})
    monkeypatch.setenv("FEATCIRCUITS_CACHE", str(tmp_path / "cache"))
    samples = {"model": "tiny", "chunks": 2, "batch": 4, "new_tokens": 6, "seed": 0, "temperature": 1.0, "top_k": 50}
    unshipped = {"corpus": {"modules": {"stdlib": 1}, "model_samples": samples}}
    assert "2 of the 2 chunks" in set_corpus_problem(unshipped)
    assert resolve_corpus("auto", unshipped) == "offline"
    assert resolve_corpus(str(setup[1]), unshipped) == str(setup[1])
    starter = json.loads((local_set_folder(registry()["starter"]["path"]) / "set.json").read_text())
    assert set_corpus_problem(starter) is None and resolve_corpus("auto", starter) == "set"


def test_auto_label_names_peak_tokens_and_promoted_tokens(setup):
    store = setup[2]
    card = store.card("resid_1", 7)
    label = auto_label(card)
    left, _, right = label.partition(" → ")
    peaks = {e["tokens"][e["peak"]].strip() for e in card["top"]}
    assert left.split("|")[0] in peaks
    assert right.split("|")[0] == card["promoted"][0]["token"].strip()
    assert auto_label(None) is None


def test_annotations_override_and_error_nodes_name_their_site(tmp_path, setup):
    store = setup[2]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"resid_1/7": "plural subject"}))
    nodes = [{"id": "resid_1/7@2", "kind": "feature", "site": "resid_1", "position": 2},
             {"id": "resid_1/3", "kind": "feature", "site": "resid_1", "position": -1},
             {"id": "mlp_0/err@1", "kind": "error", "site": "mlp_0", "position": 1},
             {"id": "metric", "kind": "metric", "site": "metric"}]
    cards = store.cards_for_nodes(n["id"] for n in nodes)
    labels = label_nodes(nodes, cards, load_annotations(path), prompt_tokens=["The", " keys", " are"])
    assert labels["resid_1/7@2"] == "plural subject"
    assert labels["resid_1/3"] == auto_label(store.card("resid_1", 3))
    assert labels["mlp_0/err@1"] == "error at mlp_0 @ keys"
    assert "metric" not in labels
    path.write_text('["not", "a", "mapping"]')
    with pytest.raises(UserError, match="mapping node ids"):
        load_annotations(path)
    with pytest.raises(UserError, match="cannot read"):
        load_annotations(tmp_path / "missing.json")


def test_neuronpedia_urls_from_the_sae_lens_directory():
    url = neuronpedia_url("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical", 1234)
    assert url == "https://www.neuronpedia.org/gemma-2-2b/20-gemmascope-res-16k/1234"
    assert source_neuronpedia_url("saelens:gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical", 5) \
        .endswith("/20-gemmascope-res-16k/5")
    assert neuronpedia_url("no-such-release", "x", 1) is None
    assert source_neuronpedia_url("saes/starter/resid_3", 1) is None


# --------------------------------------------------------------------------- offline Gemma

@pytest.mark.slow
def test_starter_cards_on_offline_gemma(gemma_offline, tmp_path):
    """The starter set's cards for a few features over ~500 tokens of real English text."""
    from pydoc_data.topics import topics

    from featcircuits.labels import auto_label

    sm = SplicedModel(gemma_offline, load_dictionary_set("starter", gemma_offline.adapter))
    corpus = tmp_path / "pydoc.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    feats = {"resid_6": list(range(0, 1024, 64)), "mlp_3": [1, 2, 3]}
    s = StoreSettings(tokens=512, top_k=5, batch=4)
    store = feature_store(sm, str(corpus), s, features=feats, cache=tmp_path / "cache", progress=False)
    windows = store.tensors["windows"].long()
    _, values = sm.cache({"input_ids": windows, "attention_mask": torch.ones_like(windows)})
    f = values["resid_6"].f[:, 1:]
    with_cards = 0
    for feat in feats["resid_6"]:
        card = store.card("resid_6", feat)
        best = float(f[..., feat].max())
        if best <= 0:
            assert card["top"] == []
            continue
        with_cards += 1
        assert card["top"][0]["value"] == pytest.approx(best, rel=1e-3)
        assert auto_label(card) and " → " in auto_label(card)
        assert all(isinstance(t["token"], str) for t in card["promoted"]) and len(card["promoted"]) == s.logit_k
    assert with_cards >= 4  # TopK k=32 of 1024: most features fire somewhere in 500 tokens
    g = norm_gain(final_norm(gemma_offline), gemma_offline.d_model)
    torch.testing.assert_close(g, 1.0 + gemma_offline.hf.model.norm.weight.float())


# --------------------------------------------------------------------------- the fast pass

def _reference_update(st, site, f, first_window, keys, s):
    """The pass's bookkeeping as first written (kept verbatim as the reference the faster
    ``cards._update`` must reproduce bit for bit): a bool count, a pairwise tree of maxima,
    and merges that gather context rows with an expanded index."""
    import math

    def tree_max(x):
        while x.shape[1] > 1:
            h = x.shape[1] // 2
            y = torch.maximum(x[:, :h], x[:, h:2 * h])
            if x.shape[1] % 2:
                y[:, :1] = torch.maximum(y[:, :1], x[:, 2 * h:])
            x = y
        return x[:, 0]

    def merge(pre, score, val, pos, win, ctx):
        k = st[pre + "_score"].shape[0]
        best, idx = torch.cat([st[pre + "_score"], score]).topk(k, dim=0)
        st[pre + "_score"] = best
        for name, new in (("_val", val), ("_pos", pos.int()), ("_win", win.int())):
            st[pre + name] = torch.cat([st[pre + name], new]).gather(0, idx)
        both = torch.cat([st[pre + "_ctx"], ctx.to(torch.bfloat16)])
        st[pre + "_ctx"] = both.gather(0, idx[:, :, None].expand(-1, -1, both.shape[2]))

    b, T, n = f.shape
    body = f[:, 1:].float().contiguous()
    flat = body.view(-1, n)
    st[f"{site}.count"] += (flat > 0).float().sum(0).long()
    st[f"{site}.sum"] += flat.sum(0).double()
    peak = tree_max(body)
    steps = torch.arange(T - 1, dtype=body.dtype)[None, :, None]
    pos = tree_max(torch.where(body == peak[:, None], steps, -1.0)).long() + 1
    where = pos[:, :, None] + torch.arange(-s.before, s.after + 1)
    outside = (where < 1) | (where >= T)
    flat_idx = (torch.arange(b)[:, None, None] * T + where.clamp(0, T - 1)) * n + torch.arange(n)[None, :, None]
    ctx = f.float().contiguous().view(-1).take(flat_idx).masked_fill(outside, 0.0)
    win = torch.arange(first_window, first_window + b)[:, None].expand(b, n)
    active = peak > 0
    for p, score in (("top", torch.where(active, peak, -math.inf)), ("smp", torch.where(active, keys, -math.inf))):
        merge(f"{site}.{p}", score, peak, pos, win, ctx)


@pytest.mark.parametrize("dictionaries", ["random", "identity"])
def test_fast_pass_equals_the_reference_pass(setup, dictionaries, monkeypatch):
    """The faster pass (stopping after the last site, cheaper bookkeeping) keeps exactly the
    state the reference pass keeps: every tensor, top-k rows, indices and activations, bit
    for bit, unfilled rows included. The identity set (neurons) adds negative values."""
    sm, corpus, _, _ = setup
    if dictionaries == "identity":
        sm = SplicedModel(sm.model)
    windows, _ = corpus_windows(str(corpus), sm.model.tokenizer, SETTINGS.tokens)
    # more rows kept than there are windows: some rows stay unfilled, and every merge is a full one
    s = StoreSettings(**{**SETTINGS.key_dict(), "top_k": len(windows) + 2, "samples": len(windows) + 1})
    fast = stream(sm, windows, s, progress=False)
    real_run = sm.run
    monkeypatch.setattr(sm, "run", lambda inputs, hook=None, sites=None, stop=False: real_run(inputs, hook, sites))
    monkeypatch.setattr(cards, "_update", _reference_update)
    ref = stream(sm, windows, s, progress=False)
    assert fast.keys() == ref.keys()
    assert any((~torch.isfinite(v)).any() for k, v in ref.items() if k.endswith("_score"))
    for k in ref:
        assert fast[k].dtype == ref[k].dtype and torch.equal(fast[k], ref[k]), k


def test_run_can_stop_after_the_last_site(setup):
    """``stop=True`` returns no logits, runs nothing after the last visited site (the final
    norm is never called), and the sites see the same values as in a full run."""
    sm = setup[0]
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    visit = sm.sites[:4]
    seen_full, seen_stop = {}, {}
    sm.run(inputs, lambda site, x: seen_full.__setitem__(site.name, x.detach().clone()), visit)
    norm, calls = final_norm(sm.model), []
    handle = norm.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = sm.run(inputs, lambda site, x: seen_stop.__setitem__(site.name, x.detach().clone()), visit, stop=True)
        assert out is None and calls == []
        assert sm.run(inputs, lambda site, x: None, visit).shape[0] == 2 and calls == [1]
    finally:
        handle.remove()
    assert seen_stop.keys() == seen_full.keys() == {s.name for s in visit}
    for k in seen_full:
        assert torch.equal(seen_stop[k], seen_full[k]), k


def test_every_neuronpedia_id_in_sae_lens_gives_a_feature_page_url():
    """Neuronpedia's feature pages are ``/<model>/<source>/<index>`` (its API docs: the same path
    after ``/api/feature``); every id sae-lens lists for a Gemma Scope SAE makes such a URL,
    and an SAE without one gets None (no guessed URL)."""
    import re

    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    with_id = without = 0
    for release, entry in get_pretrained_saes_directory().items():
        if not release.startswith("gemma-scope"):
            continue
        ids = getattr(entry, "neuronpedia_id", None) or {}
        for sae_id in list(entry.saes_map)[:50]:
            url = neuronpedia_url(release, sae_id, 7)
            if ids.get(sae_id):
                with_id += 1
                assert re.fullmatch(r"https://www\.neuronpedia\.org/[\w.-]+/[\w.-]+/7", url), url
                assert url == f"https://www.neuronpedia.org/{ids[sae_id]}/7"
            else:
                without += 1
                assert url is None
    assert with_id > 0 and without > 0


def test_direct_effects_do_not_depend_on_the_chunk(setup):
    """Projecting features a few at a time or all at once gives the same tokens and values (values
    to float32 rounding: the matmul's blocking, and so its last bit, depends on the shape and on
    the thread count)."""
    from featcircuits.direct_effect import direct_effects

    sm = setup[0]
    d = sm.dictionary("resid_1")
    one = direct_effects(sm.model, d, torch.arange(d.d_sae), k=4, chunk=5)
    all_ = direct_effects(sm.model, d, torch.arange(d.d_sae), k=4, chunk=d.d_sae)
    assert one.keys() == all_.keys()
    for key in one:
        if one[key].is_floating_point():
            torch.testing.assert_close(one[key], all_[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(one[key], all_[key]), key
