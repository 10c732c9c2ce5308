#!/usr/bin/env bash
# The same comparison with ResNet-56 (deeper, 3x the FLOPs), with proxy fidelity. CPU, 2 cores: about 41 minutes.
set -euo pipefail
export RAY_AUTH_MODE=disabled
out=${1:-runs/digits_resnet56}
autoprune compare --model resnet56 --data digits --flops 70% 50% 30% \
    --methods uniform,greedy,wsp,tp_global,search --seeds 0 1 2 --epochs 5 \
    --space resnet_cifar --trials 16 --workers 2 --fidelity 12 --out "$out" --no-progress
