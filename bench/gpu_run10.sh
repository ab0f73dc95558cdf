#!/bin/bash
# Run 10 on the H200 device machine: LoRA dropout in the compiled layers through aten's kernel, against inductor's
# own random numbers (run 9's code), at 512-token rows, with a same-run reference and a steady-state kernel profile.
#   call 1 (carry .whl):     bash bench/gpu_run10.sh   -> bench/gpu_speed.sh: wheels, the random Falcon-7B, the run
#   then the suite (carry .gg): bash bench/gpu_suite.sh prep; (carry .gh): LIMIT_S=540 bash bench/gpu_suite.sh run
LIMIT_S=${LIMIT_S:-480} BUDGET=${BUDGET:-400} exec bash bench/gpu_speed.sh run10_512 \
  reference,speed_compiled,speed_compiled_inductor_dropout,memory_compiled,memory_compiled_inductor_dropout,speed_compiled_profiled
