#!/usr/bin/env bash
# Zero-shot likelihood of DUO (uniform-state; its exact DUO-base bound) on the eight zero-shot sets in one run
# (scripts/zero_shot.sh: one table, one JSON).
#
#   scripts/zero_shot_duo.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# CHECKPOINT defaults to the released s-sahoo/duo (Hugging Face hub; offline: a local copy).
set -euo pipefail
ZERO_SHOT_SCRIPT="$0" exec bash "$(dirname "$0")/zero_shot.sh" duo_base "s-sahoo/duo" "$@"
