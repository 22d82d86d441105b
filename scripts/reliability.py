"""Fault injection and bad inputs: what happens to the data in each case.

Runs the real CLI in subprocesses on a tiny Gemma 3 saved as a local HF folder (so the
model loads through the real loader) and writes results/reliability/{README.md,reliability.json}.

    .venv/bin/python scripts/reliability.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "reliability"
CLI = [sys.executable, "-m", "featcircuits.cli"]


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def first_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:160] if lines else ""


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from featcircuits.testing import random_saelens_set, tiny_model

    work = Path(tempfile.mkdtemp(prefix="fc-reliability-"))
    model = tiny_model("gemma3", scale=0.1)
    model_dir = work / "tiny-gemma3"
    model.hf.save_pretrained(model_dir)
    model.tokenizer.save_pretrained(model_dir)
    saes = work / "saes"
    random_saelens_set(model, saes, width=16)
    base = ["discover", "--model", str(model_dir), "--saes", str(saes), "--task", "sva-nounpp", "--n", "8",
            "--batch-size", "2", "--top-k", "12"]
    rows = []

    # 1. kill -9 during discover (right after the 3rd node chunk's checkpoint), then --resume
    ref = run(base + ["--out", str(work / "ref")])
    killed = run(base + ["--out", str(work / "killed")], env={"FEATCIRCUITS_FAULT_AFTER": "nodes-relp:3"})
    ckpt_left = (work / "killed" / ".checkpoint" / "nodes-relp.pt").exists()
    files_after_kill = sorted(p.name for p in (work / "killed").glob("*") if p.is_file())
    resumed = run(base + ["--out", str(work / "killed"), "--resume"])
    same = False
    if ref.returncode == 0 and resumed.returncode == 0:
        a = json.loads((work / "ref" / "graph.json").read_text())
        b = json.loads((work / "killed" / "graph.json").read_text())
        key = "edges" if "edges" in a else "links"
        same = a["nodes"] == b["nodes"] and a[key] == b[key]
    rows.append({"fault": "kill -9 during discover (after 3 of 4 node chunks)",
                 "exit": killed.returncode, "left": f"checkpoint kept: {ckpt_left}; files: {files_after_kill or 'none'}",
                 "outcome": f"--resume exit {resumed.returncode}; graph identical to uninterrupted run: {same}"})

    # 1b. kill -9 during curves (inside RelP's ablations), then --resume
    cbase = ["curves", "--model", str(model_dir), "--saes", str(saes), "--task", "sva-nounpp", "--n", "8",
             "--batch-size", "4", "--methods", "relp,atp,random", "--thresholds", "3", "--no-progress"]
    cref = run(cbase + ["--out", str(work / "cref")])
    ckilled = run(cbase + ["--out", str(work / "ckilled")], env={"FEATCIRCUITS_FAULT_AFTER": "curves-ablate-relp:1"})
    c_left = sorted(p.name for p in (work / "ckilled" / ".checkpoint").glob("*.pt"))
    c_written = (work / "ckilled" / "curves.json").exists()
    cresumed = run(cbase + ["--out", str(work / "ckilled"), "--resume"])
    csame = False
    if cref.returncode == 0 and cresumed.returncode == 0:
        a = json.loads((work / "cref" / "curves.json").read_text())
        b = json.loads((work / "ckilled" / "curves.json").read_text())
        csame = a["methods"] == b["methods"]
    rows.append({"fault": "kill -9 during curves (after 1 of 2 ablation chunks of RelP)",
                 "exit": ckilled.returncode, "left": f"checkpoints kept: {', '.join(c_left) or 'none'}; "
                                                      f"curves.json written: {c_written}",
                 "outcome": f"--resume exit {cresumed.returncode}; every curve point identical to uninterrupted run: "
                            f"{csame}"})

    # 1d. reruns into an --out that holds a run: finished, killed, replaced (and killed mid-swap)
    again = run(base + ["--out", str(work / "ref")])
    rows.append({"fault": "rerun into an --out holding a finished run", "exit": again.returncode,
                 "left": f"old summary.json kept: {(work / 'ref' / 'summary.json').exists()}",
                 "outcome": first_line(again.stderr)})
    run(base + ["--out", str(work / "k2")], env={"FEATCIRCUITS_FAULT_AFTER": "nodes-relp:1"})
    again = run(base + ["--out", str(work / "k2")])
    rows.append({"fault": "rerun without --resume into a killed run's --out", "exit": again.returncode,
                 "left": f"checkpoint kept: {(work / 'k2' / '.checkpoint').is_dir()}",
                 "outcome": first_line(again.stderr)})
    (work / "ref" / "evaluation.json").write_text("{}")  # an evaluation of the old circuit
    over = run(base + ["--out", str(work / "ref"), "--top-k", "5", "--overwrite"])
    n_now = json.loads((work / "ref" / "summary.json").read_text())["n_nodes"] if over.returncode == 0 else None
    rows.append({"fault": "rerun with --overwrite (old run: 12 nodes and an evaluation.json)", "exit": over.returncode,
                 "left": f"stale evaluation.json: {(work / 'ref' / 'evaluation.json').exists()}; "
                         f"siblings left: {sorted(p.name for p in work.glob('.ref*')) or 'none'}",
                 "outcome": f"summary.json now describes the new run: n_nodes {n_now}"})
    for label, extra_env in (("atomic exchange (Linux renameat2)", {}),
                             ("two renames (no renameat2)", {"FEATCIRCUITS_NO_EXCHANGE": "1"})):
        before = json.loads((work / "ref" / "summary.json").read_text())["n_nodes"]
        top = "7" if before != 7 else "6"
        dead = run(base + ["--out", str(work / "ref"), "--top-k", top, "--overwrite"],
                   env={"FEATCIRCUITS_FAULT_AFTER": "overwrite-swap:1", **extra_env})
        at_out = (f'{json.loads((work / "ref" / "summary.json").read_text())["n_nodes"]} nodes'
                  if (work / "ref" / "summary.json").exists() else "nothing (the old run is aside as .ref.old)")
        siblings = sorted(p.name.split("-")[0] for p in work.glob(".ref*"))
        # any next run into it tidies up first (here a --resume, refused: the run there is finished)
        later = run(base + ["--out", str(work / "ref"), "--resume"], env=extra_env)
        after = (json.loads((work / "ref" / "summary.json").read_text())["n_nodes"]
                 if (work / "ref" / "summary.json").exists() else "nothing")
        rows.append({"fault": f"--overwrite killed mid-swap, {label} (old {before} nodes, new {top})",
                     "exit": dead.returncode,
                     "left": f"--out holds: {at_out}; siblings: {', '.join(siblings) or 'none'}",
                     "outcome": f"next run into it (exit {later.returncode}): --out holds {after} nodes; "
                                f"siblings left: {len(list(work.glob('.ref*')))}"})

    # 1e. a Ctrl-C (SIGINT) once the first checkpoint is on disk, then --resume
    sig_args = CLI + base[:] + ["--method", "ig", "--steps", "4", "--n", "64", "--batch-size", "1",
                                "--out", str(work / "sigint")]
    # SIGINT's default disposition for the child: under `nohup ... &` it would inherit "ignored"
    proc = subprocess.Popen(sig_args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while not list((work / "sigint").glob(".checkpoint/*.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the first checkpoint is on disk (renamed into place); let the process note it
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    said = [l for l in err.splitlines() if l.startswith("featcircuits:")]
    rows.append({"fault": "Ctrl-C (SIGINT) during discover --method ig", "exit": proc.returncode,
                 "left": f"checkpoint kept: {(work / 'sigint' / '.checkpoint').is_dir()}; traceback: {'Traceback' in err}",
                 "outcome": (said[-1] if said else "no message")[:160]})

    # 1f. pairs the patching cannot use, and --n larger than the file
    mixed = work / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"clean_prefix": c, "patch_prefix": p, "clean_answer": " is",
                                         "patch_answer": " are"}) + "\n" for c, p in [
        ("The king near the car", "The kings near the car"),
        ("The king said that", "The Queen of the Netherlands said that"),
        ("The dog near the car", "The dogs near the car"),
        ("The boy near the car", "The boys near the car")]))
    r = run(base + ["--task", str(mixed), "--n", "16", "--out", str(work / "mixed")])
    s = json.loads((work / "mixed" / "summary.json").read_text()) if r.returncode == 0 else {}
    said = [l for l in r.stderr.splitlines() if l.startswith("featcircuits:")]
    rows.append({"fault": "a clean/patch pair of different token lengths, and --n 16 on a 4-pair file",
                 "exit": r.returncode,
                 "left": f"pairs_requested {s.get('pairs_requested')}, available {s.get('pairs_available')}, "
                         f"dropped {s.get('pairs_dropped')}, used {s.get('pairs_used')}",
                 "outcome": " / ".join(said)[:300]})

    # 1c. kill -9 during SAE training (after 2 of 4 steps), then resume (a few sentences as corpus)
    train = ("import sys; sys.path.insert(0, %r)\n"
             "from featcircuits.testing import tiny_model\n"
             "from featcircuits.tasks import make_pairs\n"
             "from featcircuits.training import corpus as C, trainer as T\n"
             "m = tiny_model('gemma3', scale=0.1)\n"
             "docs = {'tiny': [p.clean_prefix + p.clean_answer for p in make_pairs('sva-nounpp', 120, 0)]}\n"
             "c = C.build_corpus(m.tokenizer, docs=docs, window=16, eval_fraction=0.1, cache=False)\n"
             "cfg = T.TrainConfig(sites=['resid_0', 'mlp_1'], width=16, attn_width=12, k=4, tokens=480, batch_size=8,"
             " sae_batch=60, checkpoint_every=1, eval_tokens=120, save_dtype='float32')\n"
             "T.train_saes(m, c, sys.argv[1], cfg, resume=sys.argv[2] == 'resume', progress=False)\n") % str(ROOT)
    py = lambda *a, env=None: subprocess.run([sys.executable, "-c", train, *a], capture_output=True, text=True,
                                             cwd=ROOT, env={**os.environ, **(env or {})})
    tref = py(str(work / "tref"), "fresh")
    tkilled = py(str(work / "tkilled"), "fresh", env={"FEATCIRCUITS_FAULT_AFTER": "train:2"})
    t_left = sorted(p.name for p in (work / "tkilled").iterdir()) if (work / "tkilled").exists() else []
    tresumed = py(str(work / "tkilled"), "resume")
    tsame = False
    if tref.returncode == 0 and tresumed.returncode == 0:
        tsame = all((work / "tref" / s / "sae_weights.safetensors").read_bytes()
                    == (work / "tkilled" / s / "sae_weights.safetensors").read_bytes() for s in ("resid_0", "mlp_1"))
    rows.append({"fault": "kill -9 during SAE training (after 2 of 4 forwards)", "exit": tkilled.returncode,
                 "left": f"files: {', '.join(t_left) or 'none'}",
                 "outcome": f"resume exit {tresumed.returncode}; saved weights byte-identical to uninterrupted run: "
                            f"{tsame}"})

    # 2. kill during a write: a large file being written atomically, killed mid-way
    target = work / "atomic" / "big.json"
    target.parent.mkdir()
    target.write_text('{"old": true}\n')
    code = ("import sys; sys.path.insert(0, %r); from featcircuits.io import write_text; "
            "write_text(%r, 'x' * 400_000_000)") % (str(ROOT), str(target))
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    content = target.read_text()[:40]
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name]
    rows.append({"fault": "kill -9 while writing a 400 MB output file", "exit": proc.returncode,
                 "left": f"final file holds: {content.strip()!r}; temp files left: {len(leftovers)}",
                 "outcome": "old file intact" if content.startswith('{"old"') else "file changed"})

    # 3. corrupt and truncated dictionary weights
    weights = saes / "resid_0" / "sae_weights.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    r = run(base + ["--out", str(work / "trunc")])
    rows.append({"fault": "truncated sae_weights.safetensors", "exit": r.returncode, "left":
                 f"output folder created: {(work / 'trunc').exists()}", "outcome": first_line(r.stderr)})
    weights.write_bytes(b"\x00" * 16 + blob[16:])
    r = run(base + ["--out", str(work / "tamper")])
    rows.append({"fault": "tampered sae_weights.safetensors (header zeroed)", "exit": r.returncode, "left":
                 f"output folder created: {(work / 'tamper').exists()}", "outcome": first_line(r.stderr)})
    weights.write_bytes(blob)

    # 4. bad inputs, each checked before any work
    bad_task = work / "bad.json"
    bad_task.write_text('{"clean_prefix": "The author", "patch_prefix": "The authors", "clean_answer": " is", '
                        '"patch_answer": " are"}\n{broken\n')
    multi = work / "multi.json"
    multi.write_text('{"clean_prefix": "The author", "patch_prefix": "The authors", "clean_answer": " is here", '
                     '"patch_answer": " are here"}\n')
    other_width = work / "other"
    random_saelens_set(tiny_model("gemma3", d_model=16), other_width, width=8, sites={"resid_1"})
    cases = [
        ("malformed JSON line in task file", ["--task", str(bad_task)]),
        ("answers that are not single tokens", ["--task", str(multi)]),
        ("dictionary width does not match the site", ["--saes", str(other_width)]),
        ("unknown model spec", ["--model", str(work / "nope.gguf")]),
        ("negative node threshold", ["--node-threshold", "-1"]),
        ("share outside (0, 1]", ["--share", "1.5"]),
        ("output path is a file", ["--out", str(bad_task)]),
        ("unknown task name", ["--task", "sva-nothing"]),
    ]
    for name, extra in cases:
        args = base + ["--out", str(work / "bad_out")]
        for i in range(0, len(extra), 2):  # replace or append the flag
            if extra[i] in args:
                args[args.index(extra[i]) + 1] = extra[i + 1]
            else:
                args += extra[i:i + 2]
        r = run(args)
        rows.append({"fault": f"bad input: {name}", "exit": r.returncode,
                     "left": f"output folder created: {(work / 'bad_out').exists()}; traceback: {'Traceback' in r.stderr}",
                     "outcome": first_line(r.stderr)})

    for r in rows:  # the temporary folder's name changes every run
        for k in ("left", "outcome"):
            r[k] = r[k].replace(str(work), "<tmp>")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "reliability.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Reliability: faults injected and bad inputs", "",
             "Made by `.venv/bin/python scripts/reliability.py` (real CLI in subprocesses, tiny Gemma 3 saved "
             "as a local HF folder, random sae-lens dictionaries).", "",
             "| fault or input | exit code | what was left | what happened |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['fault']} | {r['exit']} | {r['left']} | {r['outcome'].replace('|', '/')} |")
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
