"""Reruns into an --out that holds an earlier run: refused, resumed or replaced, never mixed."""

import json

import pytest

from featcircuits import checkpoint, validation
from featcircuits.cli import main
from featcircuits.errors import UserError
from featcircuits.validation import check_output_file, prepare_run_folder


def _old_run(folder, checkpoint_too=False):
    folder.mkdir()
    (folder / "summary.json").write_text('{"old": true}')
    (folder / "evaluation.json").write_text('{"old": true}')
    if checkpoint_too:
        (folder / ".checkpoint").mkdir()
        (folder / ".checkpoint" / "nodes-relp.pt").write_bytes(b"x")


def test_previous_run_is_refused_with_the_way_out(tmp_path):
    _old_run(tmp_path / "a")
    with pytest.raises(UserError, match="previous run.*--overwrite"):
        prepare_run_folder(tmp_path / "a")
    _old_run(tmp_path / "b", checkpoint_too=True)
    with pytest.raises(UserError, match="a killed run's checkpoint is here: rerun with --resume"):
        prepare_run_folder(tmp_path / "b")
    assert prepare_run_folder(tmp_path / "b", resume=True).work == tmp_path / "b"
    with pytest.raises(UserError, match="no checkpoint"):
        prepare_run_folder(tmp_path / "a", resume=True)
    with pytest.raises(UserError, match="give one of them"):
        prepare_run_folder(tmp_path / "a", resume=True, overwrite=True)
    assert not (tmp_path / "fresh").exists() and prepare_run_folder(tmp_path / "fresh").work == tmp_path / "fresh"


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_the_whole_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setenv("FEATCIRCUITS_NO_EXCHANGE", "1")
    out = tmp_path / "run"
    _old_run(out)
    rf = prepare_run_folder(out, overwrite=True)
    work = rf.open()
    assert work != out and (out / "summary.json").exists()  # the old run stays until the new one is complete
    (work / "summary.json").write_text('{"new": true}')
    assert rf.commit() == out
    assert json.loads((out / "summary.json").read_text()) == {"new": True}
    assert not (out / "evaluation.json").exists()  # no stale evaluation beside the new circuit
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


class Killed(BaseException):
    pass


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_killed_mid_swap_leaves_old_or_new(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setenv("FEATCIRCUITS_NO_EXCHANGE", "1")

    def die(stage, done):
        if stage == "overwrite-swap":
            raise Killed

    monkeypatch.setattr(checkpoint, "fault_point", die)
    out = tmp_path / "run"
    _old_run(out)
    rf = prepare_run_folder(out, overwrite=True)
    (rf.open() / "summary.json").write_text('{"new": true}')
    with pytest.raises(Killed):
        rf.commit()
    prepare_run_folder(tmp_path / "other")  # any later start tidies up; here the next run into ``out``:
    prepare_run_folder(out, overwrite=True)
    content = json.loads((out / "summary.json").read_text())
    assert content in ({"new": True}, {"old": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_failed_run_with_overwrite_keeps_the_old_folder(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    with pytest.raises(RuntimeError):
        with prepare_run_folder(out, overwrite=True).writing() as work:
            (work / "summary.json").write_text("{}")
            raise RuntimeError("model failed")
    assert json.loads((out / "summary.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_evaluation_file_is_not_replaced_silently(tmp_path):
    (tmp_path / "evaluation.json").write_text("{}")
    with pytest.raises(UserError, match="--overwrite"):
        check_output_file(tmp_path / "evaluation.json")
    assert check_output_file(tmp_path / "evaluation.json", overwrite=True) == tmp_path / "evaluation.json"


def test_discover_rerun_refused_then_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--task", "sva-nounpp", "--n", "4",
            "--top-k", "8", "--no-edges", "--out", str(out)]
    assert main(args) == 0
    (out / "evaluation.json").write_text("{}")  # an evaluation of this circuit
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert main(args + ["--top-k", "3", "--overwrite"]) == 0
    assert not (out / "evaluation.json").exists()
    assert json.loads((out / "summary.json").read_text())["n_nodes"] <= 3


def test_n_larger_than_the_task_file_warns_and_records_both(tiny_model_dir, tmp_path, capsys):
    task = tmp_path / "four.jsonl"
    task.write_text("".join(json.dumps({"clean_prefix": f"The {a} near the cars", "patch_prefix": f"The {b} near the cars",
                                        "clean_answer": " is", "patch_answer": " are"}) + "\n"
                            for a, b in [("dog", "dogs"), ("cat", "cats"), ("king", "kings"), ("boy", "boys")]))
    out = tmp_path / "run"
    assert main(["discover", "--model", str(tiny_model_dir), "--saes", "identity", "--task", str(task), "--n", "16",
                 "--top-k", "5", "--no-edges", "--out", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--n 16" in line]
    assert len(warnings) == 1 and "only 4 pairs" in warnings[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_requested"] == 16 and summary["pairs_available"] == 4
    assert summary["pairs_used"] == 4 - summary["pairs_dropped"]


def test_sigint_prints_one_line_and_exits_130(tiny_model_dir, tmp_path):
    """A real SIGINT in a real CLI process, raised right after its first checkpoint is on disk."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    # The child gets SIGINT's default disposition back: a suite started in the background
    # (`nohup bash .ci/run &`) ignores SIGINT, a child inherits that, and Python then installs
    # no Ctrl-C handler at all (the run would go on to the end, exit 0).
    proc = subprocess.Popen([sys.executable, "-m", "featcircuits.cli", "discover", "--model", str(tiny_model_dir),
                             "--saes", "identity", "--task", "sva-nounpp", "--n", "64", "--batch-size", "1",
                             "--method", "ig", "--steps", "4", "--top-k", "5", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "FEATCIRCUITS_FAULT_AFTER": "nodes-ig:1:sigint"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("featcircuits:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert "interrupted after nodes-ig chunk" in lines[0] and "rerun with --resume to continue" in lines[0]
