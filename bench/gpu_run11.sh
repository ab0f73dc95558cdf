#!/bin/bash
# Run 11 on the H200 device machine, one call (carry .whl): where the GPU waits in a step (a chrome trace and the
# idle gaps of one profiled step, speed and memory), the LoRA B GEMM into the base output in place against a copy
# (eager and compiled) or an add inductor fuses, and the memory profile's dropout over 12 steps; step times from
# CUDA events (no host sync per step). The whole suite after it: LIMIT_S=540 bash bench/gpu_suite.sh run (carry .gh).
LIMIT_S=${LIMIT_S:-520} BUDGET=${BUDGET:-440} exec bash bench/gpu_speed.sh run11 \
  reference,speed,speed_compiled,speed_compiled_profiled,speed_compiled_lora_copy,speed_compiled_lora_fused,speed_lora_copy,memory_compiled_12,memory_compiled_inductor_dropout_12,memory_compiled_profiled
