#!/usr/bin/env bash
# Zero-shot likelihood of SEDD (its score-entropy bound) on the eight zero-shot sets in one run
# (scripts/zero_shot.sh: one table, one JSON).
#
#   scripts/zero_shot_sedd.sh [CHECKPOINT] [extra Hydra overrides ...]
#
# CHECKPOINT is required (e.g. upstream's released sedd.ckpt).
set -euo pipefail
ZERO_SHOT_SCRIPT="$0" exec bash "$(dirname "$0")/zero_shot.sh" sedd "" "$@"
