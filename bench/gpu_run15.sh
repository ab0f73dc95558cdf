#!/bin/bash
# Run 15 on the H200 device machine, one call (carry .whl): where a steady compiled speed step's time goes
# beyond its kernels. Three steps in a row under the profiler (no sync between them) and the GPU's clocks, power and
# throttle reasons (nvidia-smi, every 200 ms) while the compiled speed profile runs.
LIMIT_S=${LIMIT_S:-420} BUDGET=${BUDGET:-360} exec bash bench/gpu_speed.sh run15 \
  reference,speed_compiled,speed_compiled_profiled_3
