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
