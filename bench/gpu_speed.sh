#!/bin/bash
# One bench/speed.py run on the H200 device machine in one call (carry .whl; .gg only matters to the suite, and both together now pass the 64 MiB a call may carry): the wheels the image lacks
# (gpu_suite.sh prep), the random Falcon-7B, then the variants named.
#   usage: LIMIT_S=... BUDGET=... bash bench/gpu_speed.sh <name under $OUT> <comma-separated variants>
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH
M=/tmp/falcon7b-random
bash bench/gpu_suite.sh prep || exit 1
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a $OUT/versions.txt
python3 bench/speed.py --out /tmp/build --build-only --model-dir $M 2>&1 | tail -1
# GPU clocks, power and throttle reasons every 200 ms while the variants run (matched by their ended_utc)
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 200 > $OUT/smi_$1.csv 2>&1 &
timeout ${LIMIT_S:-500} python3 bench/speed.py --out $OUT/$1 --no-ceilings --budget-s ${BUDGET:-420} --model-dir $M \
  --only $2 2>&1 | grep -v Warning | tail -30
