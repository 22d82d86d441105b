"""Build (or reuse) the feature store of a dictionary set and record time and size.

    PYTHONPATH=$PWD nice -n 10 python scripts/build_feature_store.py \
        --model gemma-3-270m-offline --saes starter --tokens 200000 --out results/feature_store/starter.json

``featcircuits features`` builds the same store; this script also records the build's time,
throughput, size and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--corpus", default="auto", help="as `featcircuits features --corpus`")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="results/feature_store/starter.json")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default torch's; on a loaded shared machine 1 is faster: see README)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from featcircuits.cards import StoreSettings, feature_store
    from featcircuits.dictionaries import load_dictionary_set
    from featcircuits.models import load_model
    from featcircuits.tracing import SplicedModel

    load0 = round(os.getloadavg()[0], 2)
    t0 = time.time()
    model = load_model(a.model)
    sm = SplicedModel(model, load_dictionary_set(a.saes, model.adapter, a.model))
    t1 = time.time()
    store = feature_store(sm, a.corpus, StoreSettings(tokens=a.tokens, batch=a.batch))
    t2 = time.time()
    size = sum(p.stat().st_size for p in Path(store.folder).iterdir())
    row = {"model": a.model, "saes": a.saes, "corpus": a.corpus,
           "corpus_used": (store.meta.get("corpus") or {}).get("source"), "tokens": store.n_tokens,
           "sites": len(store.meta["sites"]), "features": sum(len(store.tensors[f"{s}.features"]) for s in store.meta["sites"]),
           "load_seconds": round(t1 - t0, 1), "store_seconds": round(t2 - t1, 1), "store_bytes": size,
           "tokens_per_s": round(store.n_tokens / max(t2 - t1, 1e-9), 1),
           "folder": str(store.folder), "torch_threads": torch.get_num_threads(),
           # the machine is shared: the load says what the time means
           "loadavg_1min_before": load0, "loadavg_1min_after": round(os.getloadavg()[0], 2)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
