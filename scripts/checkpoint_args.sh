# Sourced by eval_owt_kaggle.sh and gen_owt_kaggle.sh (not run on its own): picks CKPT (the first
# argument when it is not a Hydra override, else the newest last.ckpt under OUTPUT_DIR), RUN_DIR
# (the checkpoint's run directory, or $OUTPUT_DIR/eval when that is read-only), and consumes the checkpoint argument from "$@". The checkpoint itself
# says how to rebuild its model (algorithm, sizes, tokenizer, the data it was trained on): no
# overrides are needed for it.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export OWT_SUBSET_NUM="${OWT_SUBSET_NUM:-11000}"
checkpoint_arg "$@"
set -- "${ARGS[@]}"
if [[ -z "$CKPT" ]]; then
  CKPT=$(find "$OUTPUT_DIR" -path '*/checkpoints/last.ckpt' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
fi
if [[ -z "$CKPT" || ! -e "$CKPT" ]]; then
  echo "error: no checkpoint ${CKPT:+at $CKPT }(looked under $OUTPUT_DIR): train first (scripts/train_owt_kaggle.sh) or pass one: $0 path/to/last.ckpt" >&2
  exit 1
fi
if [[ -f "$CKPT" ]]; then RUN_DIR="$(cd "$(dirname "$CKPT")/.." && pwd)"; else RUN_DIR="$OUTPUT_DIR/eval"; fi
[[ -w "$RUN_DIR" ]] || RUN_DIR="$OUTPUT_DIR/eval"
