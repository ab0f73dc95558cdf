#!/bin/bash
# Run 9 on the H200 device machine: the weight-cache and compile levers, the 7B start-up, then the whole suite.
# (Run 9 itself ran at 0cd151a, where the variants had the names that bench/RESULTS.md maps to these.)
#   call 1 (carry .whl .gg): bash bench/gpu_run9.sh prep   -> wheels (gpu_suite.sh prep), the C compiler that
#                                                              Triton needs, the random Falcon-7B, its start-up
#   call 2:                  bash bench/gpu_run9.sh 512    -> the levers at 512-token rows, same-run reference
#   call 3:                  bash bench/gpu_run9.sh 2048   -> the same at 2048-token rows
#   call 4 (carry .gh):      LIMIT_S=480 bash bench/gpu_suite.sh run
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH
M=/tmp/falcon7b-random
case "$1" in
prep)
  bash bench/gpu_suite.sh prep || exit 1
  (command -v gcc cc; python3 -c "import triton; print('triton', triton.__version__)") 2>&1 | tee -a $OUT/versions.txt
  python3 bench/speed.py --out /tmp/build --build-only --model-dir $M 2>&1 | tail -2
  python3 bench/startup_7b.py --model-dir $M --json $OUT/startup_7b.json --work-dir /tmp/startup 2>&1 | tail -40 ;;
512)
  timeout ${LIMIT_S:-560} python3 bench/speed.py --out $OUT/run9_512 --no-ceilings --budget-s ${BUDGET:-380} \
    --model-dir $M --only grads_reference,grads_speed_compiled,reference,speed_eager,memory_compiled,speed,speed_compiled,speed_eager_compiled \
    2>&1 | grep -v Warning | tail -40 ;;
2048)
  timeout ${LIMIT_S:-560} python3 bench/speed.py --out $OUT/run9_2048 --no-ceilings --budget-s ${BUDGET:-300} \
    --model-dir $M --only grads_reference,grads_memory_compiled,reference_2048,memory_2048,memory_2048_compiled,speed_2048_compiled,speed_2048 \
    2>&1 | grep -v Warning | tail -30 ;;
esac
