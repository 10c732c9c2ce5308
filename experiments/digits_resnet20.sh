#!/usr/bin/env bash
# README results (small section): digits with ResNet-20 at 70/50/30% FLOPs, 3 seeds, 5 fine-tune
# epochs, every arm but fastnas and the widths-only ablation, plus proxy fidelity on 24 random
# structures per budget. The greedy is the DI authors' (accuracy selection, re-scoring every
# step, 1% steps). CPU, 2 cores: see the README for the measured time.
set -euo pipefail
export RAY_AUTH_MODE=disabled
out=${1:-runs/digits_resnet20}
time autoprune compare --model resnet20 --data digits --flops 70% 50% 30% \
    --methods uniform,greedy,wsp,tp_global,selfgroup,random,search --seeds 0 1 2 --epochs 5 \
    --space resnet_cifar --trials 16 --workers 2 --fidelity 24 --out "$out" --no-progress
