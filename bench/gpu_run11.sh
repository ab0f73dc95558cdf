#!/bin/bash
# Run 11 on the H200 device machine, one call (carry .whl .gg): where the GPU waits in a step (a chrome trace and the
# idle gaps of one profiled step, speed and memory), the LoRA B GEMM into the base output in place against a copy
# (eager and compiled) or an add inductor fuses, and the memory profile's dropout over 12 steps; step times from
# CUDA events (no host sync per step). The whole suite after it: LIMIT_S=540 bash bench/gpu_suite.sh run (carry .gh).
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH
M=/tmp/falcon7b-random
bash bench/gpu_suite.sh prep || exit 1
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a $OUT/versions.txt
python3 bench/speed.py --out /tmp/build --build-only --model-dir $M 2>&1 | tail -1
timeout ${LIMIT_S:-520} python3 bench/speed.py --out $OUT/run11 --no-ceilings --budget-s ${BUDGET:-440} --model-dir $M \
  --only reference,speed,speed_compiled,speed_compiled_profiled,speed_compiled_lora_copy,speed_compiled_lora_fused,speed_lora_copy,memory_compiled_12,memory_compiled_inductor_dropout_12,memory_compiled_profiled \
  2>&1 | grep -v Warning | tail -30
