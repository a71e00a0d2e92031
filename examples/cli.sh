#!/usr/bin/env bash
# The command line: train, export, demo. Usage: bash examples/cli.sh [STEPS] [MODEL]   (default 100, minilm)
set -euo pipefail
STEPS=${1:-100}
MODEL=${2:-minilm}
OUT=${OUT:-runs/cli-example}
# --8<-- [start:train]
hyperadalora train --method hyperadalora --model-name-or-path "$MODEL" --task sentiment \
    --max-steps "$STEPS" --per-device-train-batch-size 16 --learning-rate 1e-3 --logging-steps 10 \
    --output-dir "$OUT" --overwrite-output-dir
# --8<-- [end:train]
# --8<-- [start:export]
hyperadalora export "$OUT/adapter" --format peft --output "$OUT/lora"                 # per-layer ranks
hyperadalora export "$OUT/adapter" --format peft-uniform --allowed-ranks vllm --output "$OUT/lora-uniform"
# --8<-- [end:export]
