#!/usr/bin/env bash
# Fashion-MNIST comparison for one CIFAR-style model: every arm at 50/30/15% of the FLOPs,
# 5 seeds, paired statistics, compute accounting and proxy fidelity (24 structures per
# budget). Usage: experiments/fashion_mnist.sh MODEL [OUT]. Resumable: run it again after an
# interruption and finished runs are reused (only when every setting matches).
#
# Choices, for a 2-core CPU machine:
#  - 16x16 images and the dense baseline trained once on all 55,000 training images (5,000
#    more are the validation split, the official 10,000 the test set), 30 epochs;
#  - fine-tuning (every arm, same recipe) on a stratified 10,000-image subset for 2 epochs: at
#    mild budgets on real data a long fine-tune erases structure differences, and 10k x 2
#    keeps a run near a minute;
#  - the authors' DI greedy in 2%-of-FLOPs steps (the authors use 0.5%; 4x fewer steps);
#  - search, random and search_widths: resnet_cifar space, 16 trials, 2 workers (1 thread each);
#  - fastnas runs when `pip install -e ".[peers]"` is installed, and is skipped with one line otherwise.
# Copy results.*, fidelity.* and the plots to docs/results/fashion_mnist_MODEL/ when it finishes.
set -euo pipefail
export RAY_AUTH_MODE=disabled
model=${1:?usage: experiments/fashion_mnist.sh MODEL [OUT]}
out=${2:-runs/fashion_mnist_$model}
mkdir -p "$out"
base="$out/base.pt"
if [ ! -f "$base" ]; then
    autoprune train --model "$model" --data fashion-mnist --image-size 16 --epochs 30 --seed 0 \
        --out "$base" --no-progress
fi
time autoprune compare --checkpoint "$base" --data fashion-mnist --image-size 16 --train-size 10000 \
    --flops 50% 30% 15% --seeds 0 1 2 3 4 --epochs 2 --greedy-step 0.02 \
    --space resnet_cifar --trials 16 --workers 2 --fidelity 24 --out "$out" --no-progress
