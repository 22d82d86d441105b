#!/usr/bin/env python
"""Reproduce the agreement tables (issue 3) for the offline Gemma 3 270M.

Runs ``featcircuits agreement`` for

- IOI, components granularity (n = 32 by default),
- sva-simple, components granularity,
- sva-simple, features granularity with identity dictionaries,
- sva-simple, features granularity with the ``starter`` dictionaries when
  the dictionary registry (``featcircuits/data/registry.json``) registers them,

writing each into ``results/agreement/<task>_<granularity>[_<saes>]/``, then puts the
combined table (with the commands that made it) into ``results/README.md`` under the
heading ``## Node effects vs exact patching``, leaving the file's other sections alone.

    .venv/bin/python scripts/agreement.py [--threads 1] [--only ioi_components,...] [--table-only]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from featcircuits.plotting import method_label  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
OUT = RESULTS / "agreement"
HEADING = "## Node effects vs exact patching"
MODEL = "gemma-3-270m-offline"
README_INTRO = """# Results

Measured outputs of featcircuits on this machine (CPU). Each section names the script and
commands that made it; the raw outputs sit beside this file.
"""


def runs(n_ioi: int, n_sva: int, starter: bool, methods: str, ioi_methods: str) -> dict[str, list[str]]:
    common = ["--model", MODEL, "--quiet"]
    out = {
        "ioi_components": ["--task", "ioi", "--n", str(n_ioi), "--granularity", "components",
                           "--methods", ioi_methods],
        "sva-simple_components": ["--task", "sva-simple", "--n", str(n_sva), "--granularity", "components"],
        "sva-simple_features_identity": ["--task", "sva-simple", "--n", str(n_sva), "--granularity", "features",
                                         "--saes", "identity"],
    }
    for order in ("io-first", "s-first"):  # IOI's two word orders apart (``ioi`` mixes them)
        out[f"ioi-{order}_components"] = ["--task", f"ioi-{order}", "--n", str(n_ioi), "--granularity", "components",
                                          "--saes", "identity", "--methods", "atp,relp:paper,relp:two-point",
                                          "--no-variant", "--repeats", "1"]
    if starter:
        out["sva-simple_features_starter"] = ["--task", "sva-simple", "--n", str(n_sva), "--granularity",
                                              "features", "--saes", "starter"]
    for name, args in out.items():
        if "--methods" not in args:
            args += ["--methods", methods]
    # --overwrite: these runs regenerate the committed results folders in place
    return {name: ["agreement", *args, *common, "--out", str((OUT / name).relative_to(ROOT)), "--overwrite"]
            for name, args in out.items()}


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def combined_table(names: list[str], commands: dict[str, list[str]]) -> str:
    """One row per (run, method): Pearson r per site kind, seconds, and the targets."""
    kinds = ["resid", "attn", "mlp", "embed"]
    lines = ["| run | method | " + " | ".join(kinds) + " | seconds | x AtP |",
             "|---|---|" + "---|" * len(kinds) + "---|---|"]
    notes, missed = [], []
    for name in names:
        path = OUT / name / "agreement.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        sec = r["seconds"]
        for m in r["methods"]:
            rules = r["method_params"][m]["rules"]
            label = m + (f" ({','.join(rules)})" if rules else "")
            ratio = f"{sec[m] / sec['atp']:.2f}" if sec.get("atp") else "n/a"
            row = [f"`{name}`", label, *(fmt(r["pearson"][m].get(k)) for k in kinds), f"{sec[m]:.1f}", ratio]
            lines.append("| " + " | ".join(row) + " |")
        lines.append(f"| `{name}` | exact patching | " + " | ".join("1" if k in r["site_kinds"] else "n/a"
                                                                   for k in kinds)
                     + f" | {sec['exact']:.1f} | " + (f"{sec['exact'] / sec['atp']:.2f}" if sec.get("atp") else "n/a")
                     + " |")
        if r["granularity"] == "features":
            s = r["sample"]
            notes.append(f"- `{name}`: {s['description']} (aggregation `{s['aggregation']}`; sampled per kind: "
                         + ", ".join(f"{k} {v['sampled']} of {v['nodes']}" for k, v in s["per_kind"].items())
                         + "). Pearson on the random part alone: "
                         + "; ".join(f"{m} " + ", ".join(f"{k} {fmt(v)}" for k, v in pr.items())
                                     for m, pr in r["pearson_random"].items()) + ".")
        verdicts = [f"{c['check']}: {'met' if c['passed'] else '**missed**'} ({c['value']})" for c in r["targets"]]
        tag = "" if r["granularity"] == "components" else " (the targets are defined for components; shown for reference)"
        notes.append(f"- `{name}` targets{tag}: " + "; ".join(verdicts) + ".")
        if r["granularity"] == "components":
            missed += [f"`{name}`: {c['check']} ({c['value']})" for c in r["targets"] if not c["passed"]]
        if r.get("cells"):
            few = [k for k, c in r["cells"].items() if c["nonzero_exact"] < 3]
            notes.append("  Grid cells with a nonzero exact effect: " + ", ".join(
                f"{k} {c['nonzero_exact']} of {c['all']}" for k, c in r["cells"].items())
                + (f"; for {', '.join(few)} r says little more than whether the signs agree." if few else "."))
        if r["granularity"] == "components" and r.get("differing_positions"):
            notes.append("  " + diagnostics(r))
        sets = (f"dictionaries `{r['saes']}` (sha256 {r['dictionaries_sha256'][:12]}), "
                if r["granularity"] == "features" and r.get("dictionaries_sha256") else "")
        threads = f", {r['torch_threads']} torch thread(s)" if r.get("torch_threads") else ""
        notes.append(f"  {sets}n = {r['n']} pairs ({r['pairs_dropped']} dropped){threads}, clean metric "
                     f"{r['metric_clean']:+.2f}, patch metric {r['metric_patch']:+.2f}; "
                     f"`featcircuits {shlex.join(command_as_run(commands[name], r))}`")
    return "\n".join(lines), notes, missed


def word_order_table() -> list[str]:
    """IOI's two word orders side by side: Pearson r resid / attn / mlp per method."""
    rows = []
    for order, what in (("io-first", "indirect object first: When A and B ..., B gave ... to -> A"),
                        ("s-first", "subject first: When B and A ..., B gave ... to -> A")):
        path = OUT / f"ioi-{order}_components" / "agreement.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        for m in r["methods"]:
            rules = r["method_params"][m]["rules"]
            name = "AtP" if m == "atp" else method_label("relp:" + "+".join(rules)) if rules else m
            rows.append(f"| {what} | {name} | " + " | ".join(fmt(r["pearson"][m].get(k)) for k in ("resid", "attn", "mlp"))
                        + " |")
    if not rows:
        return []
    return ["IOI by word order (issue 14: the built-in `ioi` mixes both; `ioi-io-first` and `ioi-s-first` keep "
            "one each; components, n = 32 each, the runs `ioi-io-first_components` and `ioi-s-first_components` "
            "above). The RelP authors' rules track exact patching on the first order and lose the residual "
            "stream on the second; the two-point rules hold on both:", "",
            "| word order | method | resid | attn | mlp |", "|---|---|---|---|---|", *rows, ""]


def command_as_run(command: list[str], r: dict) -> list[str]:
    """The command with ``--methods`` as the result records it (a later call of this script
    with other ``--methods`` must not rewrite the provenance of a run it did not redo).
    ``relp+ah`` is added by the CLI beside ``relp``, so it is not a flag value."""
    cmd = list(command)
    if "--methods" in cmd:
        cmd[cmd.index("--methods") + 1] = ",".join(m for m in r["methods"] if m != "relp+ah")
    return cmd


def diagnostics(r: dict) -> str:
    """Where the exact effect sits, and how the estimates compare there, layer by layer."""
    p = r["differing_positions"][0]
    parts = []
    for kind in ("resid", "mlp", "attn"):
        ex = r["grids"]["exact"].get(kind)
        if not ex:
            continue
        total = sum(abs(v) for row in ex for v in row)
        at_p = sum(abs(row[p]) for row in ex)
        layers = sorted({0, len(ex) // 2, len(ex) - 1})
        cols = "; ".join(f"L{layer} " + "/".join(f"{r['grids'][m][kind][layer][p]:+.2f}"
                                                 for m in ["exact", *[m for m in ("atp", "relp") if m in r["grids"]]])
                         for layer in layers)
        parts.append(f"{kind}: {100 * at_p / total:.0f}% of the exact |effect| at position {p}, "
                     f"where exact/" + "/".join(m for m in ("atp", "relp") if m in r["grids"]) + f" give {cols}")
    return (f"Prompts differ at positions {r['differing_positions']} (of {r['seq_len']}). " + " | ".join(parts) + ".")


def write_readme(section: str) -> None:
    from featcircuits.io import replace_section

    replace_section(RESULTS / "README.md", HEADING, section, intro=README_INTRO)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-ioi", type=int, default=32)
    p.add_argument("--n-sva", type=int, default=32)
    p.add_argument("--methods", default="atp,relp,ig", help="methods of the sva-simple runs")
    p.add_argument("--ioi-methods", default="atp,relp",
                   help="methods of the IOI run (IG there costs about six times exact patching on a CPU: "
                        "add it with atp,relp,ig when time allows)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 when another job runs)")
    p.add_argument("--only", default=None, help="comma list of run names (default: all)")
    p.add_argument("--table-only", action="store_true", help="rebuild the README table from existing results")
    args = p.parse_args(argv)

    import torch

    from featcircuits.cli import main as cli
    from featcircuits.dictionaries import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    starter = "starter" in registry()
    commands = runs(args.n_ioi, args.n_sva, starter, args.methods, args.ioi_methods)
    names = list(commands) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = set(names) - set(commands)
    if unknown:
        p.error(f"unknown run(s) {', '.join(sorted(unknown))}; choose from {', '.join(commands)}")
    if not args.table_only:
        for name in names:
            t0 = time.time()
            print(f"== {name}: featcircuits {shlex.join(commands[name])}", flush=True)
            rc = cli(commands[name])
            if rc:
                print(f"{name} failed with exit code {rc}", file=sys.stderr)
                return rc
            print(f"   {name} took {time.time() - t0:.0f}s", flush=True)
    table, notes, missed = combined_table(list(commands), commands)
    verdict = ("All components-granularity targets are met." if not missed else
               "Targets missed (components granularity): " + "; ".join(missed) + ". See the note below the table.")
    section = "\n".join([
        HEADING, "",
        f"Pearson r of each estimator against exact activation patching on `{MODEL}` "
        "(components: over the prompt-averaged layer x position grid of each site kind; features: over a "
        "sample of nodes, see the notes). Each RelP row names its rules: the runs made before RelP's default "
        "became the two-point rules (issue 18) ran `relp` with the RelP authors' rules (LN + identity + half), "
        "and `relp+ah` adds the AH-rule; other rule sets, and where the IOI resid gap comes from, in "
        "`## LRP rules`. Seconds: node effects on the same batch; AtP and RelP are the median of "
        "interleaved repeats. Made by `.venv/bin/python scripts/agreement.py [--only RUN,...] [--threads T]` "
        "(runs may be remade one at a time, so each run's note below gives its own command and the torch "
        "threads it ran on); raw outputs, scatter plots and per-run tables in `results/agreement/<run>/`.", "",
        table, "", *word_order_table(), verdict, "", *notes, "", "",
    ])
    write_readme(section)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
