#!/usr/bin/env bash
# ResNet-50 on ImageNet (imagefolder with train/ and val/) at 56% FLOPs (DI: -44%).
# Train a baseline first (torchvision recipe, ~90 epochs) or bring one saved by 'autoprune train'.
set -euo pipefail
export RAY_AUTH_MODE=disabled
data=${1:?usage: imagenet_resnet50.sh /path/to/imagenet [out]}; out=${2:-runs/imagenet_resnet50}
autoprune train --model resnet50 --data "imagefolder:$data" --epochs 90 --batch-size 256 --out "$out/base.pt"
autoprune prune --checkpoint "$out/base.pt" --flops 56% --method greedy --criterion di \
    --epochs 30 --distill --out "$out/greedy_di"
autoprune search --checkpoint "$out/base.pt" --flops 56% --space generic --trials 64 --workers 8 \
    --epochs 30 --out "$out/search"
