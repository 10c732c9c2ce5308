#!/usr/bin/env bash
# README results: every method at 70/50/30% FLOPs on digits with ResNet-20, 3 seeds,
# plus proxy fidelity on 12 random structures. CPU, 2 cores: about 21 minutes (baseline included).
set -euo pipefail
export RAY_AUTH_MODE=disabled
out=${1:-runs/digits_resnet20}
autoprune compare --model resnet20 --data digits --flops 70% 50% 30% \
    --methods uniform,greedy,wsp,tp_global,search --seeds 0 1 2 --epochs 5 \
    --space resnet_cifar --trials 16 --workers 2 --fidelity 12 --out "$out" --no-progress
