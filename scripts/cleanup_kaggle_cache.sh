#!/usr/bin/env bash
# Free disk space on Kaggle (/kaggle/working is limited to 20 GB of saved output).
#
#   scripts/cleanup_kaggle_cache.sh [--dry-run] [--checkpoints] [--hub]
#
# Always removes (they are rebuilt when needed): tokenized data caches ($DUO_DATA_CACHE, data_cache/
# in the project, and under OUTPUT_DIR), the Hugging Face datasets cache, pip's cache, leftovers of
# interrupted atomic writes (.*.tmp) and __pycache__. Never removes a last.ckpt.
#   --checkpoints  also the periodic checkpoints (step-*.ckpt) next to each last.ckpt
#   --hub          also downloaded Hugging Face models (e.g. the gpt2-large judge, ~3 GB)
#   --dry-run      only list what would go and how much space it holds
# OUTPUT_DIR defaults to /kaggle/working when it exists, else ./outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0 CKPTS=0 HUB=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --checkpoints) CKPTS=1 ;;
    --hub) HUB=1 ;;
    *) echo "error: unknown argument $arg (use --dry-run, --checkpoints, --hub)" >&2; exit 2 ;;
  esac
done
if [[ -z "${OUTPUT_DIR:-}" ]]; then
  if [[ -d /kaggle/working ]]; then OUTPUT_DIR=/kaggle/working; else OUTPUT_DIR="$PWD/outputs"; fi
fi
HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"
targets=()
add() { [[ -e "$1" ]] && targets+=("$1"); return 0; }
if [[ -n "${DUO_DATA_CACHE:-}" ]]; then add "$DUO_DATA_CACHE"; fi
add "$OUTPUT_DIR/data_cache"
add "$PWD/data_cache"
add "${HF_DATASETS_CACHE:-$HF_HOME/datasets}"
add "$HOME/.cache/pip"
while IFS= read -r -d '' p; do targets+=("$p"); done < <(
  find "$OUTPUT_DIR" "$PWD" \( -name .venv -o -name .git \) -prune -o \
    \( -name '.*.tmp' -o -name '.setup_check.*' -o -name __pycache__ \) -prune -print0 2>/dev/null | sort -zu)
if [[ $CKPTS == 1 ]]; then
  while IFS= read -r -d '' p; do targets+=("$p"); done < <(
    find "$OUTPUT_DIR" -path '*/checkpoints/step-*.ckpt' -print0 2>/dev/null)
fi
[[ $HUB == 1 ]] && add "${HF_HUB_CACHE:-$HF_HOME/hub}"
if [[ ${#targets[@]} == 0 ]]; then
  echo "Nothing to clean."
  exit 0
fi
before=$(df -Pk "$OUTPUT_DIR" 2>/dev/null | awk 'NR==2 {print $4}' || echo 0)
for t in "${targets[@]}"; do
  echo "$(du -sh "$t" 2>/dev/null | cut -f1)	$t"
done
if [[ $DRY == 1 ]]; then
  echo "(dry run: nothing removed)"
  exit 0
fi
rm -rf -- "${targets[@]}"
after=$(df -Pk "$OUTPUT_DIR" 2>/dev/null | awk 'NR==2 {print $4}' || echo 0)
echo "Removed ${#targets[@]} item(s); free space in $OUTPUT_DIR: $((before / 1024)) MiB -> $((after / 1024)) MiB"
