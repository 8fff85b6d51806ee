#!/usr/bin/env bash
# Samples from a checkpoint with 8-step Greedy-Tail sampling (sampling.steps=8
# sampling.noise_removal=greedy; SEDD, which has no greedy noise removal: ancestral), their
# entropy and generative perplexity (gpt2-large judge).
#
#   scripts/gen_owt_kaggle.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# Without CHECKPOINT: the newest last.ckpt under OUTPUT_DIR [/kaggle/working, else ./outputs].
# The model, algorithm and data settings are read from the run's config_train.yaml when it is
# there (so any checkpoint of kaggle_train.py or train_owt_kaggle.sh evaluates as trained), else
# the train script's defaults (ALGO, MODEL, LENGTH, OWT_SUBSET_NUM); overrides given here win.
# Writes samples.json (texts + metrics) into the run directory (or $OUTPUT_DIR/eval when
# read-only). Offline (HF_HUB_OFFLINE=1) the generative perplexity is skipped; a local judge
# works: eval.gen_ppl_eval_model_name_or_path=/path/to/gpt2-large.
set -euo pipefail
source "$(dirname "$0")/checkpoint_args.sh"
args=(mode=sample_eval data=openwebtext-split "algo=${ALGO:-duo_base}" "model=${MODEL:-small}" "model.length=${LENGTH:-512}"
      "${SAVED[@]}")
algo=""
for a in "${args[@]}"; do [[ "$a" == algo=* ]] && algo="${a#algo=}"; done  # the last one wins
removal=greedy
[[ "$algo" == sedd ]] && removal=ancestral
args+=(trainer.precision=16 loader.eval_batch_size=8 sampling.steps=8 "sampling.noise_removal=$removal"
      sampling.num_sample_batches=1 "data.cache_dir='$OUTPUT_DIR/data_cache'"
      "eval.checkpoint_path='$CKPT'" "hydra.run.dir='$RUN_DIR'")
[[ "${HF_HUB_OFFLINE:-0}" == 1 ]] && args+=(eval.compute_generative_perplexity=false)
args+=("$@")
echo "+ OWT_SUBSET_NUM=$OWT_SUBSET_NUM $PY main.py ${args[*]}"
exec "$PY" main.py "${args[@]}"
