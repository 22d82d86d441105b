"""A viewer screenshot of a real circuit: cards for its nodes, circuit.html, headless Chromium.

    PYTHONPATH=$PWD python -m featcircuits.cli discover --task sva-simple --n 64 \
        --aggregation none --top-k 60 --out /tmp/sva
    PYTHONPATH=$PWD nice -n 10 python scripts/viewer_screenshot.py /tmp/sva --out results/viewer

Builds the cards in the subset mode (only the circuit's features) over ``--tokens`` of the
offline corpus, writes ``circuit.html`` beside the run and into ``--out``, pins the
feature of largest |effect| and saves ``viewer-<task>.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a discover output folder (with graph.json)")
    ap.add_argument("--out", default="results/viewer")
    ap.add_argument("--tokens", type=int, default=8192)
    a = ap.parse_args()
    from featcircuits.cards import StoreSettings, circuit_features, feature_store
    from featcircuits.dictionaries import load_dictionary_set
    from featcircuits.labels import label_nodes
    from featcircuits.models import load_model
    from featcircuits.tracing import SplicedModel
    from featcircuits.viewer import write_html

    run, out = Path(a.run), Path(a.out)
    data = json.loads((run / "graph.json").read_text())
    prov = data["metadata"]["provenance"]
    t0 = time.time()
    model = load_model(prov["model"])
    sm = SplicedModel(model, load_dictionary_set(prov["dictionaries"], model.adapter, prov["model"]))
    ids = [n["id"] for n in data["nodes"]]
    store = feature_store(sm, "offline", StoreSettings(tokens=a.tokens), features=circuit_features(ids))
    cards = store.cards_for_nodes(ids)
    labels = label_nodes(data["nodes"], cards, prompt_tokens=prov.get("prompt_tokens"))
    seconds = round(time.time() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    task = prov["task"]["name"] if isinstance(prov["task"], dict) else str(prov["task"])
    html = write_html(run / "circuit.html", data, cards, labels)
    shutil.copy(html, out / f"circuit-{task}.html")
    best = max((n for n in data["nodes"] if n["id"] in cards), key=lambda n: abs(n.get("effect", 0.0)))
    png = out / f"viewer-{task}.png"
    _screenshot(html, best["id"], png)
    top = sorted((n for n in data["nodes"] if n["id"] in cards), key=lambda n: -abs(n["effect"]))[:10]
    table = [{"id": n["id"], "effect": round(n["effect"], 4), "label": labels.get(n["id"]),
              "top_context": "".join(cards[n["id"]]["top"][0]["tokens"]) if cards[n["id"]]["top"] else ""}
             for n in top]
    (out / f"top-features-{task}.json").write_text(json.dumps(
        {"run": str(run), "tokens": store.n_tokens, "card_seconds": seconds, "n_cards": len(cards),
         "n_nodes": len(ids), "top": table}, indent=1, ensure_ascii=False) + "\n")
    print(png, f"{len(cards)} cards in {seconds} s")


def _screenshot(html: Path, pin: str, png: Path) -> None:
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


if __name__ == "__main__":
    main()
