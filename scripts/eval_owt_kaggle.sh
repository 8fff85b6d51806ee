#!/usr/bin/env bash
# Likelihood bound (NLL, PPL, BPD) of a checkpoint on the OpenWebText subset's validation split.
#
#   scripts/eval_owt_kaggle.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# Without CHECKPOINT: the newest last.ckpt under OUTPUT_DIR [/kaggle/working, else ./outputs].
# The model, algorithm and data settings are read from the run's config_train.yaml when it is
# there (so any checkpoint of kaggle_train.py or train_owt_kaggle.sh evaluates as trained), else
# the train script's defaults (ALGO, MODEL, LENGTH, OWT_SUBSET_NUM); overrides given here win.
# Writes ppl_eval.json into the run directory (or $OUTPUT_DIR/eval when that is read-only).
set -euo pipefail
source "$(dirname "$0")/checkpoint_args.sh"
args=(mode=ppl_eval data=openwebtext-split "algo=${ALGO:-duo_base}" "model=${MODEL:-small}" "model.length=${LENGTH:-512}"
      trainer.precision=16 loader.eval_batch_size=8 "data.cache_dir='$OUTPUT_DIR/data_cache'" "${SAVED[@]}"
      "eval.checkpoint_path='$CKPT'" "hydra.run.dir='$RUN_DIR'" "$@")
echo "+ OWT_SUBSET_NUM=$OWT_SUBSET_NUM $PY main.py ${args[*]}"
exec "$PY" main.py "${args[@]}"
