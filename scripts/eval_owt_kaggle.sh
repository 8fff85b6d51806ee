#!/usr/bin/env bash
# Likelihood bound (NLL, PPL, BPD) of a checkpoint on the validation split of the data it was
# trained on (the OpenWebText subset for checkpoints of train_owt_kaggle.sh).
#
#   scripts/eval_owt_kaggle.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# CHECKPOINT: a .ckpt, a Hugging Face directory or hub id; default the newest last.ckpt under
# OUTPUT_DIR [/kaggle/working, else ./outputs]. The checkpoint carries its algorithm, model sizes
# and data; overrides given here win (e.g. data=wikitext103 to evaluate zero-shot).
# Writes ppl_eval.json into the run directory (or $OUTPUT_DIR/eval when that is read-only).
set -euo pipefail
source "$(dirname "$0")/checkpoint_args.sh"
args=(mode=ppl_eval "eval.checkpoint_path='$CKPT'" "hydra.run.dir='$RUN_DIR'" "$@")
echo "+ OWT_SUBSET_NUM=$OWT_SUBSET_NUM $PY main.py ${args[*]}"
exec "$PY" main.py "${args[@]}"
