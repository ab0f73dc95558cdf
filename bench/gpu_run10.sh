#!/bin/bash
# Run 10 on the H200 device machine: LoRA dropout in the compiled layers through aten's kernel, against inductor's
# own random numbers (run 9's code), at 512-token rows, with a same-run reference and a steady-state kernel profile.
#   call 1 (carry .whl .gg): bash bench/gpu_run10.sh   -> wheels (gpu_suite.sh prep), the random Falcon-7B, the run
#   call 2 (carry .gh):      LIMIT_S=540 bash bench/gpu_suite.sh run
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH
M=/tmp/falcon7b-random
bash bench/gpu_suite.sh prep || exit 1
python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a $OUT/versions.txt
python3 bench/speed.py --out /tmp/build --build-only --model-dir $M 2>&1 | tail -1
timeout ${LIMIT_S:-480} python3 bench/speed.py --out $OUT/run10_512 --no-ceilings --budget-s ${BUDGET:-400} \
  --model-dir $M --only reference,speed_compiled,speed_compiled_inductor_dropout,memory_compiled,memory_compiled_inductor_dropout,speed_compiled_profiled \
  2>&1 | grep -v Warning | tail -25
