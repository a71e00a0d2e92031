#!/usr/bin/env bash
# The checks to run the day a GPU is lent (none has run this script yet: nothing is claimed for a GPU until it has).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make install`
#
# 1. the device-agnostic tests (pytest -m device) on cuda (HYPERADALORA_TEST_DEVICE=cuda);
# 2. bf16 step time and peak memory of hyperadalora vs peft's adalora and lora at batch 1..64
#    (benchmarks/step_time.py --device cuda --dtype bfloat16; MiniLM seq 128, SmolLM2 seq 256);
# 3. training runs on MiniLM (embedded sentiment task): hyperadalora and adalora on a 4-bit (nf4) base
#    (`hyperadalora train ... --load-in-4bit`), and hyperadalora on the bf16 base for comparison;
# then prints one table (also written to OUT/table.md). A failed step is reported in the table; the others still run.
# Settings (environment): PY (.venv/bin/python), OUT (runs/gpu_check), BATCHES (1,2,4,8,16,32,64), STEPS (20),
# MODELS ("minilm smollm2"), TRAIN_STEPS (60).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
BATCHES=${BATCHES:-1,2,4,8,16,32,64}
STEPS=${STEPS:-20}
MODELS=${MODELS:-minilm smollm2}
TRAIN_STEPS=${TRAIN_STEPS:-60}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False with $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "$PY")):" \
         "this script measures a GPU and runs nothing without one. Run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi
mkdir -p "$OUT"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" | tee "$OUT/device.txt"

step() { echo "== $*" >&2; }

step "1/3 device-agnostic tests on cuda"
HYPERADALORA_TEST_DEVICE=cuda "$PY" -m pytest -q -m device -p no:cacheprovider --junitxml "$OUT/tests.xml" \
    > "$OUT/tests.log" 2>&1
echo $? > "$OUT/tests.rc"
tail -n 3 "$OUT/tests.log" >&2

step "2/3 bf16 step time and peak memory, batch $BATCHES"
for model in $MODELS; do
    case $model in
        smollm2) extra=(--kind instruction --seq-len 256) ;;
        *) extra=(--kind classification --seq-len 128) ;;
    esac
    "$PY" benchmarks/step_time.py --device cuda --dtype bfloat16 --model "$model" "${extra[@]}" \
        --batch-sizes "$BATCHES" --steps "$STEPS" --json "$OUT/step_time_$model.json" \
        --markdown "$OUT/step_time_$model.md" > "$OUT/step_time_$model.log" 2>&1
    echo $? > "$OUT/step_time_$model.rc"
done

step "3/3 training runs: 4-bit base (--load-in-4bit) and bf16 base"
common=(--model minilm --task sentiment --max-steps "$TRAIN_STEPS" --batch-size 16 --lr 1e-3 --device cuda
        --precision bf16 --init-r 3 --target-r 2 --keep-checkpoints 0 --no-progress --overwrite)
for method in hyperadalora adalora; do
    "$PY" benchmarks/gpu_check_report.py train "$OUT/train_${method}_4bit-nf4.json" -- --method "$method" \
        "${common[@]}" --load-in-4bit --output-dir "$OUT/runs/${method}_4bit" > "$OUT/train_${method}_4bit.log" 2>&1
done
"$PY" benchmarks/gpu_check_report.py train "$OUT/train_hyperadalora_bf16-base.json" -- --method hyperadalora \
    "${common[@]}" --output-dir "$OUT/runs/hyperadalora_bf16" > "$OUT/train_hyperadalora_bf16.log" 2>&1

"$PY" benchmarks/gpu_check_report.py table "$OUT" | tee "$OUT/table.md"
