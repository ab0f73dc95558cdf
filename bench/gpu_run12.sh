#!/bin/bash
# Run 12 on the H200 device machine, one call (carry .whl .gg): with the weight cache, the base GEMM and LoRA's B GEMM
# as one op (falcon_qlora::linear_lora) against two (inductor copies the base output before adding into it), eager
# and compiled, with the LoRA gradient check of the compiled speed profile and a profiled step.
# The whole suite after it: LIMIT_S=540 bash bench/gpu_suite.sh run (carry .gh).
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH
M=/tmp/falcon7b-random
bash bench/gpu_suite.sh prep || exit 1
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a $OUT/versions.txt
python3 bench/speed.py --out /tmp/build --build-only --model-dir $M 2>&1 | tail -1
timeout ${LIMIT_S:-500} python3 bench/speed.py --out $OUT/run12 --no-ceilings --budget-s ${BUDGET:-420} --model-dir $M \
  --only grads_reference,grads_speed_compiled,reference,speed,speed_compiled,speed_compiled_profiled,speed_compiled_two_ops,speed_two_ops \
  2>&1 | grep -v Warning | tail -14
