#!/bin/bash
# Run 19 on the H200 device machine, one call (carry .whl), right before the suite's other two calls (it does the
# suite's first prep itself): every target of the 512- and 2048-token rows against the same run's reference, the
# memory profile's fused paged AdamW and the step shortcuts around Trainer's Python, each also left out alone, and
# the LoRA gradient check. First a check that the fused optimizer's moments stay out of torch's allocator.
OUT=${OUT:-/tmp/out}
bash bench/gpu_suite.sh prep > /dev/null || exit 1
PYTHONPATH=/tmp/site:$PWD/src python3 - <<'PY' 2>&1 | grep -v -i warn | tee $OUT/paged_adamw_check.txt
import torch
from falcon_qlora.optimizer import PagedAdamW
ps = [torch.nn.Parameter(torch.randn(4544, 64, device="cuda")) for _ in range(256)]
for p in ps:
    p.grad = torch.randn_like(p)
torch.cuda.synchronize(); before = torch.cuda.memory_allocated()
opt = PagedAdamW(ps, lr=2e-4); opt.step(); torch.cuda.synchronize()
print("paged moments:", 2 * sum(p.numel() for p in ps) * 4 / 2**20, "MiB; allocator grew",
      (torch.cuda.memory_allocated() - before) / 2**20, "MiB")
PY
LIMIT_S=${LIMIT_S:-500} BUDGET=${BUDGET:-410} exec bash bench/gpu_speed.sh run19 \
  grads_reference,grads_memory_compiled,reference,speed_compiled,memory_compiled_12,memory_compiled_20,memory_compiled_12_bnb_optim,memory_compiled_12_trainer_walks,reference_2048,speed_2048_compiled,memory_2048
