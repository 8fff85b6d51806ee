#!/usr/bin/env bash
# Samples of a SEDD checkpoint with the analytic predictor, their entropy and generative
# perplexity (gpt2-large judge), as upstream's script: 100 batches of 8 sequences.
#
#   scripts/gen_ppl_owt_sedd.sh [--steps N] [--seed S] CHECKPOINT [extra Hydra overrides ...]
#
# --steps: sampling steps (default 32); --seed (default 1). Writes the samples and metrics to
# $OUTPUT_DIR/gen_ppl_owt_sedd/<seed>-<steps>-<checkpoint name>.json. Offline the judge must be
# local (eval.gen_ppl_eval_model_name_or_path=DIR) or eval.compute_generative_perplexity=false;
# fewer samples: sampling.num_sample_batches=N.
set -euo pipefail
source "$(dirname "$0")/env.sh"
steps=32 seed=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    *) break ;;
  esac
done
checkpoint_arg "$@"
if [[ -z "$CKPT" ]]; then
  echo "error: pass the SEDD checkpoint: $0 [--steps N] [--seed S] path/to/sedd.ckpt [overrides ...]" >&2
  exit 2
fi
out="$OUTPUT_DIR/gen_ppl_owt_sedd"
run_main mode=sample_eval data=openwebtext-split algo=sedd "seed=$seed" loader.eval_batch_size=8 \
  sampling.num_sample_batches=100 "sampling.steps=$steps" sampling.predictor=analytic \
  "eval.checkpoint_path='$CKPT'" "eval.generated_samples_path='$out/$seed-$steps-$(basename "${CKPT%.ckpt}").json'" \
  "hydra.run.dir='$out'" "${ARGS[@]}"
