#!/usr/bin/env bash
# Train SEDD (absorbing score entropy, SPEC-2 §11) on OpenWebText as upstream's script does:
# model=small, length 1024, 16 sequences per device, global batch 512 (the accumulation follows
# from the devices), validation with the SEDD bound.
#
#   scripts/train_owt_sedd.sh [extra Hydra overrides ...]     e.g. strategy=ddp trainer.devices=4
#
# Re-running the same command resumes from <run dir>/checkpoints/last.ckpt (run dir:
# $OUTPUT_DIR/owt-sedd-small-L1024 unless hydra.run.dir=...). Offline:
# data.data_files=<local OpenWebText parquet files>; a subset: OWT_SUBSET_NUM=N.
set -euo pipefail
source "$(dirname "$0")/env.sh"
run_main mode=train data=openwebtext-split model=small algo=sedd model.length=1024 loader.batch_size=16 \
  loader.eval_batch_size=16 wandb.name=sedd-owt "hydra.run.dir='$OUTPUT_DIR/owt-sedd-small-L1024'" "$@"
