#!/bin/bash
# Run 18 on the H200 device machine, one call (carry .whl), right before the suite's other two calls (it does the
# suite's first prep itself): today's memory profile against the same run's reference. Eager, as the 500-step recipe
# runs it (compile_layers=auto compiles runs of 1,000 steps or more); compiled, 12 steps with its graphs compiled in
# this process for the first time (its peak includes the compile step), then 20 steps reusing them (the loss check).
LIMIT_S=${LIMIT_S:-450} BUDGET=${BUDGET:-360} exec bash bench/gpu_speed.sh run18 \
  reference,memory_compiled_12,memory_compiled_20,memory
