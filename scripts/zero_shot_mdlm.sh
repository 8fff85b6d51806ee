#!/usr/bin/env bash
# Zero-shot likelihood of MDLM on the eight zero-shot sets in one run
# (scripts/zero_shot.sh: one table, one JSON).
#
#   scripts/zero_shot_mdlm.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# CHECKPOINT defaults to the released kuleshov-group/mdlm-owt (Hugging Face hub; offline: a local copy).
set -euo pipefail
ZERO_SHOT_SCRIPT="$0" exec bash "$(dirname "$0")/zero_shot.sh" mdlm "kuleshov-group/mdlm-owt" "$@"
