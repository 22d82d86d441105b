#!/usr/bin/env bash
# Train the `starter` SAE set for gemma-3-270m-offline from scratch: builds (or reuses the
# cached) docstring corpus, trains all 55 TopK SAEs (embed + attn/mlp/resid x 18 layers)
# together, writes saes/starter/ (sae-lens folders + set.json). Safe to rerun after a kill:
# it resumes from saes/starter/checkpoint.pt. Extra flags are passed to train-saes.
#
# The token count fits a ~65-minute budget on a shared 2-core CPU (measured ~30 tokens/s
# for all 55 sites with one torch thread while other jobs loaded the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-saes/starter}
start=$(date +%s)
OMP_NUM_THREADS=1 "$PY" -m featcircuits.training.trainer \
  --model gemma-3-270m-offline --sites all --width 1024 --attn-width 768 --k 32 \
  --tokens 120000 --batch-size 16 --sae-batch 256 --lr 4e-3 --seed 0 \
  --checkpoint-every 5 --threads 1 --out "$OUT" --resume "$@"
echo "train_starter_saes: wall time $(( $(date +%s) - start )) s"
