"""Time the feature-store pass (``cards.stream``) on the first N tokens of a corpus: wall clock
and this process's CPU time, with the machine's load; optionally save the state to compare
two checkouts bit for bit (results/feature_store/README.md).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python scripts/feature_pass_speed.py --tokens 8192 --threads 1 \
        --save /tmp/state-after.pt
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-3-270m-offline")
    ap.add_argument("--saes", default="starter")
    ap.add_argument("--corpus", default="offline")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default=None, help="torch.save the pass's state here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from featcircuits.cards import StoreSettings, stream
    from featcircuits.dictionaries import load_dictionary_set
    from featcircuits.models import load_model
    from featcircuits.text_corpus import corpus_windows
    from featcircuits.tracing import SplicedModel

    model = load_model(a.model)
    sm = SplicedModel(model, load_dictionary_set(a.saes, model.adapter, a.model))
    windows, _ = corpus_windows(a.corpus, model.tokenizer, a.tokens)
    load0 = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    state = stream(sm, windows, StoreSettings(tokens=a.tokens), progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps({"tokens": windows.numel(), "threads": a.threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                      "tok_per_wall_s": round(windows.numel() / wall, 1), "tok_per_cpu_s": round(windows.numel() / cpu, 1),
                      "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}))
    if a.save:
        torch.save(state, a.save)


if __name__ == "__main__":
    main()
