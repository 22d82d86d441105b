"""Fuzzing: malformed task files and CLI arguments get a one-line error (exit 2), never a
traceback, and leave no output behind."""

import json
import string

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from featcircuits.cli import main
from featcircuits.tasks import FIELDS

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=6)
bad_rows = st.one_of(
    st.text(alphabet=string.printable, max_size=40),  # not JSON at all
    json_values.map(json.dumps),  # JSON, wrong shape
    st.fixed_dictionaries({k: st.one_of(st.none(), st.integers(), st.just("")) for k in FIELDS}).map(json.dumps),
    st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=6), max_size=3).map(json.dumps),  # fields missing
)


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


@FUZZ
@given(rows=st.lists(bad_rows, min_size=1, max_size=4))
def test_malformed_task_files(rows, tmp_path_factory, capsys, tiny_model_dir):
    folder = tmp_path_factory.mktemp("fuzz")
    task = folder / "task.json"
    task.write_text("\n".join(rows) + "\n")
    out = folder / "out"
    code, err = _run(capsys, ["discover", "--model", str(tiny_model_dir), "--saes", "identity",
                              "--task", str(task), "--n", "4", "--out", str(out)])
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("featcircuits: error:")
    assert not out.exists()


@FUZZ
@given(argv=st.lists(st.sampled_from(["--n", "-3", "0", "abc", "--top-k", "--share", "1.5", "-0.1", "--steps",
                                      "--node-threshold", "nan", "--method", "exact", "--aggregation", "cols",
                                      "--batch-size", "--edge-threshold", "--task", "nope-task", "--rules", "xx"]),
                     max_size=6))
def test_random_discover_arguments(argv, tmp_path_factory, capsys, tiny_model_dir):
    out = tmp_path_factory.mktemp("fuzz_args") / "out"
    code, err = _run(capsys, ["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--n", "2",
                              "--out", str(out), *argv])
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_nan_in_model_names_site(tiny_model_dir, tmp_path, capsys):
    from featcircuits.errors import UserError
    from featcircuits.models import load_model
    from featcircuits.tasks import make_pairs, tokenize_pairs
    from featcircuits.tracing import SplicedModel

    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        model.hf.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    batch, _ = tokenize_pairs(make_pairs("ioi", 2), model.tokenizer)
    with pytest.raises(UserError, match="non-finite.*mlp_1"):
        SplicedModel(model).cache(batch.inputs())
