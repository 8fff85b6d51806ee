#!/usr/bin/env bash
# Zero-shot likelihood of AR (exact log-likelihood) on the eight zero-shot sets in one run
# (scripts/zero_shot.sh: one table, one JSON).
#
#   scripts/zero_shot_ar.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# CHECKPOINT is required (e.g. upstream's released ar.ckpt).
set -euo pipefail
ZERO_SHOT_SCRIPT="$0" exec bash "$(dirname "$0")/zero_shot.sh" ar "" "$@"
