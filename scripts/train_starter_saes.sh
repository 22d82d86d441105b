#!/usr/bin/env bash
# The `starter` SAE set for gemma-3-270m-offline: (re)start or resume the training run, and
# once it is complete write the set into DEST (default saes/starter-v6).
#
#   bash scripts/train_starter_saes.sh            # resume (or start) the run; install when it completes
#   INSTALL=0 bash scripts/train_starter_saes.sh  # train only (what the background launch uses)
#
# The run lives OUTSIDE the git tree (RUN, default /work/sae-runs/starter-v6): checkpoint.pt
# every few forwards, progress lines (tokens/s, ETA, FVE and dead share per site) appended to
# RUN/train.log. Killing it loses at most one checkpoint interval; rerunning this script
# continues it exactly (same flags, same corpus hash; the trainer refuses a mismatch).
# It runs under `nice -n 15` so it does not starve other work on this shared machine.
# TOKENS (default 750000): training tokens; a resume must use the same number.
# OMP_WAIT_POLICY (unset by default): PASSIVE makes a waiting thread sleep instead of spinning; on
# the idle 2 cores it cost a third of the speed (~105 against ~149 tok/s, 2 threads): the 55 small
# SAE steps are many short parallel regions, each then paying a wake-up.
# The set saes/starter-v2 (deleted since; figures in results/starter_targets/v2.md) was made with TOKENS=500000 SAMPLES=384 NAMES=0 MAX_CHARS=6400000
# ATTN_WIDTH=768 THREADS=2; saes/starter-v3 (shipped until 2026-12-04, deleted 2026-12-05; in git at 62ceb6c) with
# TOKENS=500000 SAMPLES=1920 MAX_CHARS=200000 SAMPLE_BATCH=32 THREADS=2; saes/starter-v5 (shipped from
# 2026-12-04 to 2026-12-05, registered as starter-v5) with SAMPLES=16384 MAX_CHARS=100000 PAIR_SAMPLES=0
# THREADS=2 (74 min); saes/starter-v6 (the shipped `starter`) with the defaults below and THREADS=2
# (60 min; results/README.md, "Starter dictionaries").
# THREADS (default 1): with 2 threads a run trained 149-184 tok/s on the two idle cores but fell to 37-75
# tok/s once other jobs shared them (the feature-store pass measured 2 threads 2.6-3.5x slower than 1
# on the loaded machine: the threads wait on each other); use 2 only on an idle machine.
#
# Recipe (chosen on scripts/pilot_recipe.py, results/pilot_recipe.md, by recovered share without
# the error term): TopK k=64, massive dimensions shrunk to 4x the median std (folded back into
# the saved weights), dead latents resampled every 5 forwards to the end. The env overrides
# (ARCH, K, DIM_CLIP, ...) exist for experiments; a resume must use the flags it started with.
# Corpus: SAMPLES (default 4096, 4,003 kept as English) of the model's own English samples,
# every other one opened by a common given name (NAMES=1: person names in running prose), drawn
# SAMPLE_BATCH (default 1024) at a time: the recipe of the GPU samples shipped in saes/samples/
# (on the CPU ~175 tok/s on 2 idle cores, ~4 h for these), plus docstrings of the installed packages.
# NAME_SWAPS (default 0) adds that many copies of each sample holding a given name, its names
# swapped for others of the list (train-saes --name-swaps): more occurrences of each name without
# sampling more.
# PAIR_SAMPLES (default 2944, 2,934 kept: ~39 % of the corpus's tokens) adds that many samples opened
# by two given names (train-saes --pair-samples; results/pilot_pairs: half of a pilot's prose replaced
# by them lifted IOI at resid_9/10), drawn PAIR_SAMPLE_BATCH (default 32) at a time: the CPU-sampled
# ones shipped in saes/samples/ (python -m featcircuits.training.samples N 0 --pairs makes more, at
# ~100 tok/s); on a GPU scripts/device_samples.py --pairs --batch 1024 makes them (then set
# PAIR_SAMPLE_BATCH=1024).
# MAX_CHARS (default 60000) caps each docstring source: with these samples the docstrings are ~10 %
# of the corpus (the trainer reads the first TOKENS of the shuffled corpus; v5's 100k cap with 16,000
# samples made them ~9 %, v3's 200k cap with 1,866 samples ~60 %, starter-v2's 6.4M with 384 ~99 %).
#
# Installing writes the finished run (site folders + set.json) into DEST (default saes/starter-v6);
# commit it in ONE commit (`git add -A saes/starter-v6`;
# the set is ~130 MiB and every recommit adds its full size to history), then regenerate
# results/saes.md with scripts/sae_report.py. A submission may carry at most 256 MiB of diffs,
# added and deleted files both counted: replacing a set in place (delete ~130 + add ~130 MiB)
# does not fit, so a new set goes into a new folder and the old folder is deleted in a later
# submission of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-/work/sae-runs/starter-v6}
TOKENS=${TOKENS:-750000}
DEST=${DEST:-saes/starter-v6}  # the folder the registry's `starter` names (featcircuits/data/registry.json)
INSTALL=${INSTALL:-1}
THREADS=${THREADS:-1}
mkdir -p "$RUN"
# Model samples made on a GPU (scripts/device_samples.py; results/device_samples/) ship as
# saes/samples/samples-HASH.tar.xz: the sampler unpacks the chunks it needs into its cache
# (featcircuits.training.samples.missing_chunks) instead of sampling them on the CPU, provided the
# recipe matches (SAMPLE_BATCH=1024, NAMES=1, seed 0; SAMPLES at most the archive's 81,920; the pair
# samples, sampled on this CPU: PAIR_SAMPLE_BATCH=32, seed 0, PAIR_SAMPLES at most the archive's 4,128).
start=$(date +%s)
if [ ! -f "$RUN/set.json" ]; then
  echo "train_starter_saes: $(date -u +%FT%TZ) (re)starting in $RUN" >> "$RUN/train.log"
  OMP_NUM_THREADS=$THREADS nice -n 15 "$PY" -m featcircuits.cli train-saes \
    --model gemma-3-270m-offline --sites all --width 1024 --attn-width "${ATTN_WIDTH:-512}" \
    --architecture "${ARCH:-topk}" --k "${K:-64}" --dim-clip "${DIM_CLIP:-4}" \
    --resample-until "${RESAMPLE_UNTIL:-1.0}" --resample-every "${RESAMPLE_EVERY:-5}" \
    --tokens "$TOKENS" --samples "${SAMPLES:-4096}" --sample-batch "${SAMPLE_BATCH:-1024}" $([ "${NAMES:-1}" = 1 ] && echo --sample-names) \
    --max-chars-per-source "${MAX_CHARS:-60000}" --name-swaps "${NAME_SWAPS:-0}" --pair-samples "${PAIR_SAMPLES:-2944}" --pair-sample-batch "${PAIR_SAMPLE_BATCH:-32}" --batch-size 16 --sae-batch 512 --lr 4e-3 --seed 0 \
    --checkpoint-every 10 --eval-tokens 16384 --threads "$THREADS" --no-progress \
    --out "$RUN" --resume "$@" >> "$RUN/train.log" 2>&1
  echo "train_starter_saes: $(date -u +%FT%TZ) training call ended after $(( $(date +%s) - start )) s" >> "$RUN/train.log"
fi
if [ ! -f "$RUN/set.json" ]; then
  echo "train_starter_saes: not finished; rerun to resume ($RUN/train.log)" >&2
  exit 1
fi
if [ "$INSTALL" = "1" ]; then
  tmp="$DEST.new"
  rm -rf "$tmp" && mkdir -p "$tmp"
  cp "$RUN/set.json" "$tmp/"
  for d in "$RUN"/*/; do [ -f "$d/cfg.json" ] && cp -r "$d" "$tmp/"; done
  rm -rf "$DEST.old"
  [ -d "$DEST" ] && mv "$DEST" "$DEST.old"
  mv "$tmp" "$DEST" && rm -rf "$DEST.old"
  echo "train_starter_saes: installed $DEST ($(du -sh "$DEST" | cut -f1)); commit it in one commit"
fi
