"""results/viewer from discover runs: the labelled picture, a headless-Chromium screenshot of
circuit.html with the top feature's card pinned, and the top-10 features table of every task.

One command remakes all of it (after a new dictionary set lands; ~5 discover runs)::

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python scripts/readable_results.py --discover \
        --build-store --threads 1 --runs-dir /tmp/readable-runs --out results/viewer --readme results/README.md

``--discover`` runs ``featcircuits discover --task T --n N --out RUNS_DIR/T`` for each of
``--tasks`` (default the five built-in tasks; IOI with ``--ioi-n`` pairs) first, reusing a run
folder that is already complete; ``--build-store`` builds the set's full feature store once
before (``featcircuits features``), so every run reuses it instead of building circuit-only
cards. Without ``--discover`` give the run folders instead::

    PYTHONPATH=$PWD python scripts/readable_results.py /tmp/runs/* --out results/viewer

Each run folder must hold circuit.html, graph.json and cards.json (discover writes them).
Writes ``circuit-<task>.png``, ``viewer-<task>.png`` (screenshots only with ``--screenshot``
tasks, default sva-simple and ioi), ``top-features-<task>.json`` and ``top_features.md``, and
with ``--readme`` the tables into that file between ``<!-- top-features:start -->`` and
``<!-- top-features:end -->``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def top_features(run: Path, k: int = 10) -> dict:
    data = json.loads((run / "graph.json").read_text())
    cards = json.loads((run / "cards.json").read_text()) if (run / "cards.json").is_file() else {}
    prov = data["metadata"]["provenance"]
    feats = sorted((n for n in data["nodes"] if n.get("kind") in ("feature", "embed")), key=lambda n: -abs(n["effect"]))
    rows = []
    for n in feats[:k]:
        card = cards.get(n["id"]) or {}
        top = card.get("top") or []
        rows.append({"id": n["id"], "effect": round(n["effect"], 4), "label": n.get("label"),
                     "activation_clean": n.get("activation_clean"), "n_examples": len(top),
                     "top_context": "".join(top[0]["tokens"]) if top else ""})
    task = prov["task"]["name"] if isinstance(prov["task"], dict) else str(prov["task"])
    return {"run": str(run), "task": task, "n": prov.get("n"), "n_nodes": data["metadata"]["n_nodes"],
            "quality": prov.get("quality"), "cards": prov.get("cards"), "top": rows}


def _md(cell: str) -> str:
    return str(cell).replace("|", "\\|").replace("\n", "⏎").replace("`", "'")


def markdown(tables: list[dict]) -> str:
    lines = []
    for t in tables:
        q = t.get("quality") or {}
        qs = (f"faithfulness {q['faithfulness']:.2f}, completeness {q['completeness']:.2f}, error share "
              f"{100 * q['error_share']:.0f} %" if "faithfulness" in q else "not evaluated")
        c = t.get("cards") or {}
        src = (f"; cards from the {'circuit-only' if c.get('subset') else 'full'} store, {c.get('tokens')} tokens"
               if c else "")
        lines += [f"**{t['task']}** ({t['n']} pairs, {t['n_nodes']} nodes; {qs}{src})", "",
                  "| node | effect | label | top context |", "|---|---:|---|---|"]
        for r in t["top"]:
            ctx = r["top_context"][-60:]
            lines.append(f"| `{r['id']}` | {r['effect']:+.3f} | {_md(r['label'])} | {_md(ctx)} |")
        lines.append("")
    return "\n".join(lines)


def screenshot(html: Path, pin: str, png: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1700,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(html.resolve().as_uri())
        driver.execute_script("window.featcircuitsViewer.pin(arguments[0])", pin)
        driver.save_screenshot(str(png))
    finally:
        driver.quit()


TASKS = ("sva-simple", "sva-nounpp", "sva-within-rc", "sva-rc", "ioi")
MODEL = "gemma-3-270m-offline"
START, END = "<!-- top-features:start -->", "<!-- top-features:end -->"


def set_digest(saes: str | None) -> str:
    """The dictionaries' sha256 as discover records it (``DictionarySet.digest``)."""
    from featcircuits.commands import default_saes
    from featcircuits.dictionaries import load_dictionary_set
    from featcircuits.models import load_model

    model = load_model(MODEL)
    return load_dictionary_set(default_saes(MODEL, saes), model.adapter, model.spec).digest()


def reuse_problem(summary: Path, digest: str, pairs: int) -> str | None:
    """Why the finished run with this summary.json cannot stand for a new one, or None."""
    if not summary.is_file():
        return "no run yet"
    s = json.loads(summary.read_text())
    if s.get("dictionaries_sha256") != digest:
        return f"made with dictionaries {s.get('dictionaries_sha256')}, the set is now {digest}"
    if s.get("pairs_requested") != pairs:
        return f"made with {s.get('pairs_requested')} pairs, {pairs} asked"
    return None


def discover_runs(tasks: list[str], runs_dir: Path, n: int, ioi_n: int, saes: str | None,
                  build_store: bool, threads: int | None = None) -> list[Path]:
    """Run discover once per task. A complete folder from an earlier call is reused only when it
    was made with the same dictionaries (its summary's sha256) and pair count; anything else (a run
    from the previous `starter`, say) is rerun, never reported as this set's."""
    import time

    from featcircuits.cli import main as cli

    want = set_digest(saes)

    model = ["--model", MODEL] + (["--saes", saes] if saes else []) + \
        (["--threads", str(threads)] if threads else [])
    if build_store:
        t = time.perf_counter()
        if cli(["features", *model]) != 0:
            raise SystemExit("featcircuits features failed")
        print(f"feature store ready ({time.perf_counter() - t:.0f} s)", flush=True)
    runs = []
    for task in tasks:
        run = runs_dir / task
        pairs = ioi_n if task.startswith("ioi") else n
        stale = reuse_problem(run / "summary.json", want, pairs)
        if stale:
            if stale != "no run yet":
                print(f"{task}: not reusing {run} ({stale}); rerunning", flush=True)
            t = time.perf_counter()
            rc = cli(["discover", *model, "--task", task, "--n", str(pairs), "--out", str(run), "--overwrite"])
            if rc != 0:
                raise SystemExit(f"discover --task {task} failed (exit {rc})")
            print(f"{task}: discover took {time.perf_counter() - t:.0f} s", flush=True)
        runs.append(run)
    return runs


def write_readme_tables(readme: Path, text: str) -> None:
    """Replace the tables between the markers of ``readme`` (the markers must be there)."""
    body = readme.read_text(encoding="utf-8")
    if START not in body or END not in body:
        raise SystemExit(f"{readme}: no {START} ... {END} markers to write the tables between")
    head, rest = body.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{text.strip()}\n{END}{tail}", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*", type=Path, help="discover run folders (or use --discover)")
    ap.add_argument("--out", type=Path, default=Path("results/viewer"))
    ap.add_argument("--screenshot", default="sva-simple,ioi", help="tasks to screenshot")
    ap.add_argument("--discover", action="store_true", help="run discover for --tasks into --runs-dir first")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--runs-dir", type=Path, default=Path("/tmp/readable-runs"))
    ap.add_argument("--n", type=int, default=64, help="pairs per agreement task (the quick start's 64)")
    ap.add_argument("--ioi-n", type=int, default=32, help="pairs for IOI")
    ap.add_argument("--saes", default=None, help="dictionary set (default: the model's default, starter)")
    ap.add_argument("--build-store", action="store_true",
                    help="build (or reuse) the set's full feature store before the discover runs")
    ap.add_argument("--readme", type=Path, default=None, help="also write the tables into this file's markers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the runs (1 on a loaded machine)")
    a = ap.parse_args()
    runs = list(a.runs)
    if a.discover:
        runs += discover_runs([t for t in a.tasks.split(",") if t], a.runs_dir, a.n, a.ioi_n, a.saes, a.build_store, a.threads)
    if not runs:
        ap.error("give run folders or --discover")
    a.out.mkdir(parents=True, exist_ok=True)
    tables = []
    for run in runs:
        t = top_features(run)
        tables.append(t)
        (a.out / f"top-features-{t['task']}.json").write_text(json.dumps(t, indent=1, ensure_ascii=False) + "\n")
        if t["task"] in a.screenshot.split(","):
            shutil.copy(run / "circuit.png", a.out / f"circuit-{t['task']}.png")
            shutil.copy(run / "circuit.html", a.out / f"circuit-{t['task']}.html")
            if t["top"]:
                screenshot(run / "circuit.html", t["top"][0]["id"], a.out / f"viewer-{t['task']}.png")
    text = markdown(tables)
    (a.out / "top_features.md").write_text(text)
    if a.readme is not None:
        write_readme_tables(a.readme, text)
    print(text)


if __name__ == "__main__":
    main()
