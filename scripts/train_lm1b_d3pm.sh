#!/usr/bin/env bash
# Train absorbing D3PM (discrete time, T = 1000, SPEC-2 §12) on LM1B as upstream's script does:
# model=small, length 128 (one sentence per row, padded), 64 sequences per device, global batch 512.
#
#   scripts/train_lm1b_d3pm.sh [extra Hydra overrides ...]     e.g. strategy=ddp trainer.devices=8
#
# Re-running the same command resumes from <run dir>/checkpoints/last.ckpt (run dir:
# $OUTPUT_DIR/lm1b-d3pm-small-L128 unless hydra.run.dir=...). Offline: data.data_files=<local
# LM1B files> (and a local bert-base-uncased: data.tokenizer_name_or_path=DIR).
set -euo pipefail
source "$(dirname "$0")/env.sh"
run_main mode=train data=lm1b model=small algo=d3pm model.length=128 loader.batch_size=64 \
  loader.eval_batch_size=64 wandb.name=d3pm-lm1b "hydra.run.dir='$OUTPUT_DIR/lm1b-d3pm-small-L128'" "$@"
