"""scripts/starter_targets.py on a tiny model with a random set: the per-task row, its error
shares and the error nodes it names, and the before/after table's clear error."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from featcircuits.dictionaries import load_dictionary_set
from featcircuits.testing import random_saelens_set
from featcircuits.tracing import SplicedModel

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "starter_targets.py"


@pytest.fixture(scope="module")
def st():
    spec = importlib.util.spec_from_file_location("starter_targets", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_task_row_names_its_error_nodes(st, tiny, tmp_path):
    random_saelens_set(tiny, tmp_path, width=16)
    sm = SplicedModel(tiny, load_dictionary_set(str(tmp_path), tiny.adapter))
    row = st.task_row(sm, "sva-simple", 8, 8, (5, 20), batch_size=8)
    for k in ("5", "20"):
        size = row["sizes"][k]
        assert 0.0 <= size["error_share"] <= 1.0
        tops = size["top_error_nodes"]
        # each named error node is a site of the model, its share at most the whole error share
        assert len(tops) == min(5, size["n_error_nodes"])
        assert all(site in sm.dictionaries.dictionaries for site, _ in tops)
        assert sum(share for _, share in tops) <= size["error_share"] + 1e-3
        assert [share for _, share in tops] == sorted((share for _, share in tops), reverse=True)
    r = {"saes": str(tmp_path), "label": "t", "dictionaries_sha256": "0" * 16, "report": "r.json", "n": 8, "n_eval": 8,
         "sizes": [5, 20], "sites": {}, "tasks": {"sva-simple": row}}
    table = "\n".join(st.render_error_nodes(r))
    assert "largest error nodes" in table and all(site in table for site, _ in row["sizes"]["5"]["top_error_nodes"])


def test_table_names_a_missing_measurement(st, tmp_path, monkeypatch):
    (tmp_path / "before.json").write_text(json.dumps({}))
    monkeypatch.setattr(sys, "argv", ["starter_targets.py", "--out", str(tmp_path), "--table", "before", "v9"])
    with pytest.raises(SystemExit, match="no measurement v9 .*there: before"):
        st.main()
