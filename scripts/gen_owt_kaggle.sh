#!/usr/bin/env bash
# Samples from a checkpoint with 8-step Greedy-Tail sampling (sampling.steps=8
# sampling.noise_removal=greedy; SEDD, which has no greedy noise removal: ancestral), their
# entropy and generative perplexity (gpt2-large judge).
#
#   scripts/gen_owt_kaggle.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# CHECKPOINT: as for eval_owt_kaggle.sh (default: the newest last.ckpt under OUTPUT_DIR). Writes
# samples.json (texts, token ids, entropy, generative perplexity) into the run directory (or
# $OUTPUT_DIR/eval when read-only). The samples are saved before the judge loads: offline, or
# without the judge, they are kept and can be judged later (python metrics.py samples.json --judge DIR);
# a local judge works directly: eval.gen_ppl_eval_model_name_or_path=/path/to/gpt2-large.
set -euo pipefail
source "$(dirname "$0")/checkpoint_args.sh"
# SEDD has no greedy noise removal (as upstream): its checkpoints sample with ancestral removal.
# The algorithm is read from the checkpoint safely (no code runs); main.py reports unreadable ones.
algo=$("$PY" -c 'import sys, checkpoints; print((checkpoints.read_source(sys.argv[1]).algo or {}).get("name", ""))' \
       "$CKPT" 2>/dev/null || true)
removal=greedy
[[ "$algo" == sedd ]] && removal=ancestral
args=(mode=sample_eval loader.eval_batch_size=8 sampling.steps=8 "sampling.noise_removal=$removal"
      sampling.num_sample_batches=1 "eval.checkpoint_path='$CKPT'" "hydra.run.dir='$RUN_DIR'" "$@")
echo "+ $PY main.py ${args[*]}"
exec "$PY" main.py "${args[@]}"
