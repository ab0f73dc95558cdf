#!/bin/bash
# Run 12 on the H200 device machine, one call (carry .whl): with the weight cache, the base GEMM and LoRA's B GEMM
# as one op (falcon_qlora::linear_lora) against two (inductor copies the base output before adding into it), eager
# and compiled, with the LoRA gradient check of the compiled speed profile and a profiled step.
# The whole suite after it: bash bench/gpu_suite.sh prep (carry .gg), then LIMIT_S=540 bash bench/gpu_suite.sh run (carry .gh).
LIMIT_S=${LIMIT_S:-500} BUDGET=${BUDGET:-420} exec bash bench/gpu_speed.sh run12 \
  grads_reference,grads_speed_compiled,reference,speed,speed_compiled,speed_compiled_profiled,speed_compiled_two_ops,speed_two_ops
