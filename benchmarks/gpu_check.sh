#!/usr/bin/env bash
# The checks to run the day a GPU is lent (none has run this script yet: nothing is claimed for a GPU until it has).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make install`
#
# 1. the device-agnostic tests (pytest -m device) on cuda (HYPERADALORA_TEST_DEVICE=cuda);
# 2. bf16 step time and peak memory of hyperadalora vs peft's adalora and lora at batch 1..64
#    (benchmarks/step_time.py --device cuda --dtype bfloat16; MiniLM seq 128, SmolLM2 seq 256);
# 3. training runs on MiniLM (embedded sentiment task): hyperadalora and adalora on a 4-bit (nf4) base
#    (`hyperadalora train ... --load-in-4bit`), and hyperadalora, adalora and lora on the bf16 base for comparison;
# then prints one table (also written to OUT/table.md). A failed step is reported in the table; the others still run.
# Settings (environment): PY (.venv/bin/python, else python3), OUT (runs/gpu_check), BATCHES (1,2,4,8,16,32,64),
# STEPS (20), MODELS ("minilm smollm2"), TRAIN_STEPS (60); for a machine without the model packages:
# MINILM_MODEL / SMOLLM2_MODEL (a model directory instead of the alias), RANDOM_INIT=1 (step time from the models'
# configs with random weights: the same timing, no weights file), TRAIN_4BIT=0 (no bitsandbytes there),
# TRAIN_TASK / TRAIN_DATA_DIR (e.g. sst2 and a GLUE folder, for a machine without the embedded task's package).
set -u -o pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
OUT=${OUT:-runs/gpu_check}
BATCHES=${BATCHES:-1,2,4,8,16,32,64}
STEPS=${STEPS:-20}
MODELS=${MODELS:-minilm smollm2}
TRAIN_STEPS=${TRAIN_STEPS:-60}
MINILM_MODEL=${MINILM_MODEL:-minilm}
SMOLLM2_MODEL=${SMOLLM2_MODEL:-smollm2}
RANDOM_INIT=${RANDOM_INIT:-0}
TRAIN_4BIT=${TRAIN_4BIT:-1}
TRAIN_TASK=${TRAIN_TASK:-sentiment}
TRAIN_DATA_DIR=${TRAIN_DATA_DIR:-}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here (torch.cuda.is_available() is False with $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "$PY")):" \
         "this script measures a GPU and runs nothing without one. Run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi
mkdir -p "$OUT"
"$PY" -c "import torch, transformers, peft; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)" | tee "$OUT/device.txt"

step() { echo "== $*" >&2; }

step "1/3 device-agnostic tests on cuda"
HYPERADALORA_TEST_DEVICE=cuda "$PY" -m pytest -q -m device -p no:cacheprovider --junitxml "$OUT/tests.xml" \
    > "$OUT/tests.log" 2>&1
echo $? > "$OUT/tests.rc"
tail -n 3 "$OUT/tests.log" >&2

step "2/3 bf16 step time and peak memory, batch $BATCHES"
for model in $MODELS; do
    case $model in
        smollm2) extra=(--model "$SMOLLM2_MODEL" --kind instruction --seq-len 256) ;;
        minilm) extra=(--model "$MINILM_MODEL" --kind classification --seq-len 128) ;;
        *) extra=(--model "$model" --kind classification --seq-len 128) ;;
    esac
    [ "$RANDOM_INIT" = 1 ] && extra+=(--random-init)
    "$PY" benchmarks/step_time.py --device cuda --dtype bfloat16 "${extra[@]}" \
        --batch-sizes "$BATCHES" --steps "$STEPS" --json "$OUT/step_time_$model.json" \
        --markdown "$OUT/step_time_$model.md" > "$OUT/step_time_$model.log" 2>&1
    echo $? > "$OUT/step_time_$model.rc"
done

step "3/3 training runs: 4-bit base (--load-in-4bit) and bf16 base"
common=(--model "$MINILM_MODEL" --task "$TRAIN_TASK" --max-steps "$TRAIN_STEPS" --batch-size 16 --lr 1e-3 --device cuda
        --precision bf16 --init-r 3 --target-r 2 --keep-checkpoints 0 --no-progress --overwrite)
[ -n "$TRAIN_DATA_DIR" ] && common+=(--data-dir "$TRAIN_DATA_DIR")
if [ "$TRAIN_4BIT" = 1 ]; then
    for method in hyperadalora adalora; do
        "$PY" benchmarks/gpu_check_report.py train "$OUT/train_${method}_4bit-nf4.json" -- --method "$method" \
            "${common[@]}" --load-in-4bit --output-dir "$OUT/runs/${method}_4bit" > "$OUT/train_${method}_4bit.log" 2>&1
    done
fi
for method in hyperadalora adalora lora; do
    "$PY" benchmarks/gpu_check_report.py train "$OUT/train_${method}_bf16-base.json" -- --method "$method" \
        "${common[@]}" --output-dir "$OUT/runs/${method}_bf16" > "$OUT/train_${method}_bf16.log" 2>&1
done

"$PY" benchmarks/gpu_check_report.py table "$OUT" | tee "$OUT/table.md"
