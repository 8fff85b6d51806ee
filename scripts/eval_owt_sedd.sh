#!/usr/bin/env bash
# SEDD's likelihood bound (NLL, PPL, BPD) on OpenWebText's validation split, as upstream's script.
#
#   scripts/eval_owt_sedd.sh CHECKPOINT [extra Hydra overrides ...]
#
# CHECKPOINT: a SEDD checkpoint, ours or upstream's released sedd.ckpt (Lightning), or a Hugging
# Face directory; its sizes and settings come from the checkpoint. Writes ppl_eval.json into
# $OUTPUT_DIR/eval_owt_sedd (or eval.results_path=...). Offline: data.data_files=<local files>.
set -euo pipefail
source "$(dirname "$0")/env.sh"
checkpoint_arg "$@"
if [[ -z "$CKPT" ]]; then
  echo "error: pass the SEDD checkpoint: $0 path/to/sedd.ckpt [overrides ...]" >&2
  exit 2
fi
run_main mode=ppl_eval data=openwebtext-split algo=sedd loader.eval_batch_size=16 "eval.checkpoint_path='$CKPT'" \
  "hydra.run.dir='$OUTPUT_DIR/eval_owt_sedd'" "${ARGS[@]}"
