#!/usr/bin/env bash
# Train the `starter` SAE set for gemma-3-270m-offline from scratch: builds (or reuses the
# cached) docstring corpus, trains all 55 TopK SAEs (embed + attn/mlp/resid x 18 layers)
# together, writes saes/starter/ (sae-lens folders + set.json). Safe to rerun after a kill:
# it resumes from saes/starter/checkpoint.pt. Extra flags are passed to train-saes.
#
# The token count fits a ~50-minute budget on an otherwise idle 2-core CPU: one forward
# collects the 55 sites at ~385 tokens/s, and a dense optimizer step of all 55 SAEs runs at
# ~150 tokens/s (fp32 matmuls near the cores' peak; a gather/embedding_bag sparse decode
# measured 2-4x slower here), so ~100 tokens/s end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-saes/starter}
start=$(date +%s)
OMP_NUM_THREADS=1 "$PY" -m featcircuits.training.trainer \
  --model gemma-3-270m-offline --sites all --width 1024 --attn-width 768 --k 32 \
  --tokens 300000 --batch-size 16 --sae-batch 512 --lr 4e-3 --seed 0 \
  --checkpoint-every 5 --threads 2 --out "$OUT" --resume "$@"
echo "train_starter_saes: wall time $(( $(date +%s) - start )) s"
