#!/bin/bash
# Run 16 on the H200 device machine, one call (carry .whl): the reference, compiled speed and compiled memory
# profiles logged as the recipe logs (every 10 steps, bench/speed.py LOGGING_STEPS), with the GPU's clocks and power.
LIMIT_S=${LIMIT_S:-330} BUDGET=${BUDGET:-300} exec bash bench/gpu_speed.sh run16 reference,speed_compiled,memory_compiled_12
