"""The offline Gemma 3 270M: loads, splices exactly, does the task (slow: ~1 min)."""

import pytest
import torch

from featcircuits.cli import main
from featcircuits.dictionaries import load_dictionary_set
from featcircuits.metric import metric
from featcircuits.tasks import Pair, tokenize_pairs
from featcircuits.testing import random_saelens_set
from featcircuits.tracing import SplicedModel

pytestmark = pytest.mark.slow


def test_info_offline(capsys):
    assert main(["info", "--model", "gemma-3-270m-offline", "--saes", "identity"]) == 0
    out = capsys.readouterr().out
    assert "resid_17" in out and "gemma3" in out


def test_offline_splicing_identity_and_saelens(gemma_offline, tmp_path):
    pairs = [Pair("The keys to the cabinet", "The key to the cabinet", " are", " is"),
             Pair("When Mary and John went to the store, John gave a drink to",
                  "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")]
    batch, dropped = tokenize_pairs(pairs, gemma_offline.tokenizer)
    assert not dropped
    with torch.no_grad():
        ref = gemma_offline.hf(**batch.inputs(), logits_to_keep=1).logits[:, -1]
    # the model does the tasks: the clean answer wins (metric = patch - clean < 0)
    assert (metric(ref, batch.clean_answer, batch.patch_answer) < 0).all()
    logits, _ = SplicedModel(gemma_offline).cache(batch.inputs())
    assert (logits - ref).abs().max() <= 1e-4
    random_saelens_set(gemma_offline, tmp_path, width=64,
                       sites={"embed", "attn_3", "mlp_9", "resid_9", "resid_17"})
    dicts = load_dictionary_set(str(tmp_path), gemma_offline.adapter)
    logits, values = SplicedModel(gemma_offline, dicts).cache(batch.inputs())
    assert (logits - ref).abs().max() <= 1e-4
    assert values["resid_9"].err.abs().max() > 0


def test_half_qk_rule_recovers_the_ioi_effect_of_the_second_subject(gemma_offline):
    """Issue 3's IOI resid gap: swapping the second subject's residual carries the whole
    effect; the RelP authors' rules recover little of it on Gemma 3, the half rule on q.k
    more, the two-point rules nearly all (results/README.md, "LRP rules"). Checked at two
    layers against exact patching."""
    from featcircuits.attribution import node_effects
    from featcircuits.tasks import make_pairs
    from featcircuits.nodes import Act

    batch, _ = tokenize_pairs(make_pairs("ioi", 4), gemma_offline.tokenizer)
    sm = SplicedModel(gemma_offline)
    pos = int(torch.nonzero((batch.clean_ids != batch.patch_ids).any(0))[0])
    sites = ["resid_3", "resid_6"]
    _, clean = sm.cache(batch.inputs("clean"))
    _, patch = sm.cache(batch.inputs("patch"))
    m_clean = metric(sm.run(batch.inputs("clean")), batch.clean_answer, batch.patch_answer)
    estimates = {rules: node_effects(sm, batch, "relp", rules=rules, sites=sites, progress=False).components()
                 for rules in ("ln,identity,half", "ln,identity,half-qk", "two-point")}
    for site in sites:
        x = clean[site].f + clean[site].err
        x[:, pos] = (patch[site].f + patch[site].err)[:, pos]
        logits = sm.run_patched(batch.inputs("clean"), {site: Act(x, torch.zeros_like(x))})
        exact = float((metric(logits, batch.clean_answer, batch.patch_answer) - m_clean).mean())
        default, half_qk = (float(estimates[r][site][pos]) for r in ("ln,identity,half", "ln,identity,half-qk"))
        assert exact > 5  # the swap flips the answer
        assert abs(exact - half_qk) < abs(exact - default), (site, exact, default, half_qk)
        # the two-point rules linearise each operation between the two runs: within a quarter
        two_point = float(estimates["two-point"][site][pos])
        assert abs(exact - two_point) < 0.25 * exact, (site, exact, two_point)
