#!/usr/bin/env bash
# Zero-shot likelihood on the eight zero-shot sets (SPEC §2: ag_news, scientific_papers_pubmed,
# scientific_papers_arxiv, lambada, wikitext2, wikitext103, ptb, lm1b) in ONE run: the model is
# loaded once, each set read with its detokenizer and without EOS insertion, lm1b packed into
# blocks as upstream's lm1b-gpt2; one table printed and one JSON written (eval.results_path,
# default $OUTPUT_DIR/zero_shot_<algo>/ppl_eval.json).
#
#   scripts/zero_shot.sh ALGO DEFAULT [CHECKPOINT] [extra Hydra overrides ...]
#
# DEFAULT: the checkpoint used when CHECKPOINT is not given ('' = none); scripts/zero_shot_{ar,
# mdlm,duo,sedd}.sh call it with their algorithm and default. CHECKPOINT: our .ckpt, an upstream
# .ckpt, a Hugging Face directory or hub id. Offline:
# ZERO_SHOT_DATA_DIR=DIR reads each set from the files under DIR/<set>/ (all of them are its
# validation documents, e.g. DIR/ptb/ptb.valid.txt); the others still come from the hub.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [[ $# -lt 2 ]]; then
  echo "error: usage: $0 ALGO DEFAULT [CHECKPOINT] [overrides ...] (or scripts/zero_shot_<algo>.sh)" >&2
  exit 2
fi
algo="$1" default="$2"
shift 2
checkpoint_arg "$@"
CKPT="${CKPT:-$default}"
if [[ -z "$CKPT" ]]; then
  echo "error: pass the $algo checkpoint: $(basename "${ZERO_SHOT_SCRIPT:-$0}") path/to/$algo.ckpt [overrides ...]" >&2
  exit 2
fi
entries=()
for set in ag_news scientific_papers_pubmed scientific_papers_arxiv lambada wikitext2 wikitext103 ptb lm1b; do
  entry="name:$set"
  [[ "$set" == lm1b ]] && entry+=",wrap:true"  # as upstream's lm1b-gpt2: sentences packed, not padded
  if [[ -n "${ZERO_SHOT_DATA_DIR:-}" && -d "$ZERO_SHOT_DATA_DIR/$set" ]]; then
    entry+=",data_files:{validation:'$ZERO_SHOT_DATA_DIR/$set/*'}"
  fi
  entries+=("{$entry}")
done
datasets=$(IFS=,; echo "[${entries[*]}]")
run_main mode=ppl_eval "algo=$algo" "eval.checkpoint_path='$CKPT'" "eval.datasets=$datasets" \
  data.insert_valid_eos=false "hydra.run.dir='$OUTPUT_DIR/zero_shot_$algo'" "${ARGS[@]}"
