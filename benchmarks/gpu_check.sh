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
# 4. FSDP (tests/test_fsdp.py: 2 processes, gloo; and 2 CUDA processes with nccl where there are 2 GPUs);
# 5. step time at LLM token counts (SmolLM2, random Llama-style stacks at width 2048 / 4096; fp32 and bf16);
# 6. DeepSpeed ZeRO-2 / 3 through accelerate, where deepspeed is installed;
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

step "4/6 FSDP (issue 33): tests/test_fsdp.py (torchrun, 2 processes, gloo on this machine's CPUs; every method,"\
     "losses vs 1 process, rank decisions, 1/N base parameters, adapter loads, SIGTERM + resume bit-exact)"
"$PY" -m pytest -q -m slow tests/test_fsdp.py -p no:cacheprovider > "$OUT/fsdp_tests.log" 2>&1
echo $? > "$OUT/fsdp_tests.rc"
tail -n 3 "$OUT/fsdp_tests.log" >&2
# on CUDA: 2 processes need 2 GPUs (nccl takes one GPU per process; two processes on one GPU are refused by nccl)
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m hyperadalora train --fsdp --method hyperadalora \
        --model "$SMOLLM2_MODEL" --task alpaca --max-steps 20 --batch-size 4 --max-length 512 --precision bf16 \
        --keep-checkpoints 1 --no-progress --overwrite --output-dir "$OUT/runs/fsdp_smollm2" > "$OUT/fsdp_cuda.log" 2>&1
    echo $? > "$OUT/fsdp_cuda.rc"
else
    echo "FSDP on CUDA: $NGPU GPU(s): 2 processes need 2 GPUs with nccl; only the CPU (gloo) test above ran" > "$OUT/fsdp_cuda.log"
fi

step "5/6 step time at LLM token counts (issue 33): SmolLM2-135M and random Llama-style stacks of width 2048 / 4096"
for dtype in float32 bfloat16; do
    "$PY" benchmarks/step_time.py --device cuda --dtype "$dtype" --kind instruction \
        --models "${LLM_MODELS:-$SMOLLM2_MODEL,llama-2048,llama-4096}" --llama-layers "${LLAMA_LAYERS:-4}" \
        --seq-lens "${LLM_SEQ:-512,1024,2048,4096}" --batch-sizes "${LLM_BATCHES:-1,4}" --steps "$STEPS" --warmup 5 \
        --json "$OUT/step_time_llm_$dtype.json" --markdown "$OUT/step_time_llm_$dtype.md" > "$OUT/step_time_llm_$dtype.log" 2>&1
    echo $? > "$OUT/step_time_llm_$dtype.rc"
done

step "6/6 DeepSpeed ZeRO-2 / ZeRO-3 through accelerate (benchmarks/deepspeed_check.py; needs pip install deepspeed)"
if "$PY" -c "import deepspeed" > /dev/null 2>&1; then
    for stage in 2 3; do
        for method in hyperadalora adalora lora; do
            ZERO_STAGE=$stage "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/deepspeed_check.py \
                --method "$method" --zero-stage "$stage" --steps 6 --json "$OUT/deepspeed_zero${stage}_$method.json" \
                > "$OUT/deepspeed_zero${stage}_$method.log" 2>&1
            echo $? > "$OUT/deepspeed_zero${stage}_$method.rc"
        done
    done
else
    echo "deepspeed is not installed: pip install deepspeed, then rerun this step" > "$OUT/deepspeed.log"
fi

"$PY" benchmarks/gpu_check_report.py table "$OUT" | tee "$OUT/table.md"
