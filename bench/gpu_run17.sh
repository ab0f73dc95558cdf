#!/bin/bash
# Run 17 on the H200 device machine, one call (carry .whl; code at 80f0c97, where the memory profile still had the
# paged AdamW without a sync per tensor, since removed): the memory profile's last three levers (the 4-bit base
# and LoRA B GEMMs as one op, the paged AdamW without a sync per tensor, dropout masks kept as bits), each also left
# out alone, against the same run's reference; its gradients and 20-step losses; three steps under the profiler.
LIMIT_S=${LIMIT_S:-560} BUDGET=${BUDGET:-470} exec bash bench/gpu_speed.sh run17 \
  grads_reference,grads_memory_compiled,reference,memory_compiled_20,memory_compiled_12_two_ops,memory_compiled_12_synced_optim,memory_compiled_12_byte_masks,memory_compiled_profiled_3
