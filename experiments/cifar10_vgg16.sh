#!/usr/bin/env bash
# VGG-16-BN on CIFAR-10 at 50% and 37% FLOPs (FPAR's setting is -62.8%).
set -euo pipefail
export RAY_AUTH_MODE=disabled
root=${1:-data}; out=${2:-runs/cifar10_vgg16}
autoprune train --model vgg16_bn --data cifar10 --data-root "$root" --download --epochs 160 --out "$out/base.pt"
autoprune compare --checkpoint "$out/base.pt" --data-root "$root" --flops 50% 37% \
    --methods uniform,greedy,wsp,tp_global,search --seeds 0 1 2 --epochs 100 \
    --space vgg_cifar --trials 64 --workers 4 --out "$out/compare"
