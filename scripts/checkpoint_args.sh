# Sourced by the scripts that evaluate or sample a checkpoint (not run on its own): picks CKPT (the
# first argument when it is not a Hydra override, else the newest last.ckpt under OUTPUT_DIR) and
# RUN_DIR (the checkpoint's run directory, or $OUTPUT_DIR/eval when that is read-only), and consumes
# the checkpoint argument from "$@". The checkpoint itself says how to rebuild its model (algorithm,
# sizes, tokenizer, the data it was trained on): no overrides are needed for it.
source scripts/env.sh
CKPT=""
if [[ $# -gt 0 && "$1" != *=* ]]; then CKPT="$1"; shift; fi
if [[ -z "$CKPT" ]]; then
  CKPT=$(find "$OUTPUT_DIR" -path '*/checkpoints/last.ckpt' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
fi
if [[ -z "$CKPT" || ! -e "$CKPT" ]]; then
  echo "error: no checkpoint ${CKPT:+at $CKPT }(looked under $OUTPUT_DIR): train first (scripts/train_owt_kaggle.sh) or pass one: $0 path/to/last.ckpt" >&2
  exit 1
fi
if [[ -f "$CKPT" ]]; then RUN_DIR="$(cd "$(dirname "$CKPT")/.." && pwd)"; else RUN_DIR="$OUTPUT_DIR/eval"; fi
[[ -w "$RUN_DIR" ]] || RUN_DIR="$OUTPUT_DIR/eval"
