"""results/viewer from discover runs: the labelled picture, a headless-Chromium screenshot of
circuit.html with the top feature's card pinned, and the top-10 features table.

    PYTHONPATH=$PWD python -m featcircuits.cli discover --task sva-simple --n 64 --out /tmp/runs/sva-simple
    PYTHONPATH=$PWD python scripts/readable_results.py /tmp/runs/* --out results/viewer

Each run folder must hold circuit.html, graph.json and cards.json (discover writes them).
Writes ``circuit-<task>.png``, ``viewer-<task>.png`` (screenshots only with ``--screenshot``
tasks, default sva-simple and ioi), ``top-features-<task>.json`` and ``top_features.md``.
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
        lines += [f"**{t['task']}** ({t['n']} pairs, {t['n_nodes']} nodes; {qs})", "",
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/viewer"))
    ap.add_argument("--screenshot", default="sva-simple,ioi", help="tasks to screenshot")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    tables = []
    for run in a.runs:
        t = top_features(run)
        tables.append(t)
        (a.out / f"top-features-{t['task']}.json").write_text(json.dumps(t, indent=1, ensure_ascii=False) + "\n")
        if t["task"] in a.screenshot.split(","):
            shutil.copy(run / "circuit.png", a.out / f"circuit-{t['task']}.png")
            shutil.copy(run / "circuit.html", a.out / f"circuit-{t['task']}.html")
            if t["top"]:
                screenshot(run / "circuit.html", t["top"][0]["id"], a.out / f"viewer-{t['task']}.png")
    (a.out / "top_features.md").write_text(markdown(tables))
    print(markdown(tables))


if __name__ == "__main__":
    main()
