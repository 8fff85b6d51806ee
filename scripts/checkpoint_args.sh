# Sourced by eval_owt_kaggle.sh and gen_owt_kaggle.sh (not run on its own): picks the checkpoint
# (the first argument when it is not a Hydra override, else the newest last.ckpt under OUTPUT_DIR)
# and sets PY and OUTPUT_DIR (scripts/common.sh), CKPT, RUN_DIR and SAVED (the overrides that
# rebuild the trained model and data from the run's config_train.yaml). Consumes the checkpoint
# argument from "$@".
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export OWT_SUBSET_NUM="${OWT_SUBSET_NUM:-11000}" WANDB_MODE="${WANDB_MODE:-offline}"
# Hydra overrides that rebuild the trained model and data from a run's config_train.yaml.
saved_overrides() {
  [[ -f "$1" ]] || return 0
  "$PY" - "$1" <<'PY'
import re
import sys
from omegaconf import OmegaConf
c = OmegaConf.load(sys.argv[1])
def value(v):
    if OmegaConf.is_list(v):
        return '[' + ','.join(value(x) for x in v) + ']'
    if v is None or isinstance(v, (bool, int, float)):
        return 'null' if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    # Hydra quoted string: backslashes doubled only before a quote or at the end
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ('\\' + m[2] if m[2] else ''), str(v)) + "'"
out = [f'algo={c.algo.name}', f'model={c.model.name}', f'data={c.data.name}', f'trainer.precision={c.trainer.precision}']
out += [f'model.{k}={value(v)}' for k, v in c.model.items() if k != 'name']
for k in ('tokenizer_name_or_path', 'data_files', 'train_files', 'valid_files', 'cache_dir', 'wrap', 'valid_docs'):
    if k in c.data and not OmegaConf.is_interpolation(c.data, k):
        out.append(f'data.{k}={value(c.data[k])}')
print('\n'.join(out))
PY
}
CKPT=""
if [[ $# -gt 0 && "$1" != *=* ]]; then CKPT="$1"; shift; fi
if [[ -z "$CKPT" ]]; then
  CKPT=$(find "$OUTPUT_DIR" -path '*/checkpoints/last.ckpt' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
  [[ -n "$CKPT" ]] || CKPT=$(find "$OUTPUT_DIR" -name '*.ckpt' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-)
fi
if [[ -z "$CKPT" || ! -f "$CKPT" ]]; then
  echo "error: no checkpoint ${CKPT:+at $CKPT }(looked under $OUTPUT_DIR): train first (scripts/train_owt_kaggle.sh) or pass one: $0 path/to/last.ckpt" >&2
  exit 1
fi
RUN_DIR="$(cd "$(dirname "$CKPT")/.." && pwd)"
[[ -w "$RUN_DIR" ]] || RUN_DIR="$OUTPUT_DIR/eval"
mapfile -t SAVED < <(saved_overrides "$(dirname "$CKPT")/../config_train.yaml")
