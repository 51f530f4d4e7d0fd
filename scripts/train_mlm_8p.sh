#!/usr/bin/env bash
# RoBERTa masked language modelling on WikiText-2 with 8 processes, one per device.
#
#   scripts/train_mlm_8p.sh [flags for run_mlm.py...]      e.g. --num_train_epochs 1
#
# Your flags override the defaults (the last occurrence wins). From scratch: add --model_type
# (or set MODEL=""). NPROC_PER_NODE, DEVICE=npu|cuda|cpu, AMP_FLAGS="" (fp32), OUTPUT_DIR and
# the rest are described in scripts/launch.sh. Result row: grep '^| ' OUTPUT_DIR/train.log | tail -1
export NPROC_PER_NODE="${NPROC_PER_NODE:-8}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" mlm "$@"
