#!/bin/bash
# Run 18 on the H200 device machine, one call (carry .whl), right before the suite's other two calls (it does the
# suite's first prep itself): today's memory profile against the same run's reference, compiled (20 steps, for the
# loss check) and eager (as the 500-step recipe runs it: compile_layers=auto compiles runs of 1,000 steps or more).
LIMIT_S=${LIMIT_S:-420} BUDGET=${BUDGET:-330} exec bash bench/gpu_speed.sh run18 reference,memory_compiled_20,memory
