#!/bin/bash
# (Run 13 measured the same variants with every LoRA layer breaking its compiled graph: the ops were called
# through a functools.cache wrapper that torch.compile traced into.)
# Run 14 on the H200 device machine, one call (carry .whl): each step's start without the host waiting for the
# GPU (batches copied from pinned memory without a sync, row layouts from the collator's lengths) against the old
# start, and LoRA's B GEMM first with the base GEMM accumulating onto it against the other order; speed and memory.
# The whole suite after it: bash bench/gpu_suite.sh prep (carry .gg), then LIMIT_S=540 bash bench/gpu_suite.sh run (carry .gh).
LIMIT_S=${LIMIT_S:-540} BUDGET=${BUDGET:-450} exec bash bench/gpu_speed.sh run14 \
  grads_reference,grads_speed_compiled,reference,speed_compiled,speed_compiled_profiled,speed_compiled_host_waits,speed_compiled_lora_after,memory_compiled_12,memory_compiled_12_host_waits
