#!/usr/bin/env bash
# ResNet-56 on CIFAR-10 at 50% FLOPs: baseline (160 epochs), then greedy DI, search and baselines.
set -euo pipefail
export RAY_AUTH_MODE=disabled
root=${1:-data}; out=${2:-runs/cifar10_resnet56}
autoprune train --model resnet56 --data cifar10 --data-root "$root" --download --epochs 160 --out "$out/base.pt"
autoprune compare --checkpoint "$out/base.pt" --data-root "$root" --flops 50% \
    --methods uniform,greedy,wsp,tp_global,search --seeds 0 1 2 --epochs 100 \
    --space resnet_cifar --trials 64 --workers 4 --fidelity 16 --out "$out/compare"
