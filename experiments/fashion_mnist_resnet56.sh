#!/usr/bin/env bash
# README results: Fashion-MNIST, ResNet-56 (about 3x ResNet-20's FLOPs, 27 prunable units to
# ResNet-20's 9); see fashion_mnist.sh for the recipe every arm shares. Choices for the 2-core
# machine, measured: one baseline epoch takes ~2 min with 2 torch threads and nothing else
# running (~8.7 min on one thread with the other core busy), so 10 epochs (28 min on
# 2026-12-03, 91.72% test); the greedy scores every unit's candidate at every step (3x the
# units, each 3x the cost), so 5%-of-FLOPs steps (10 steps to 50%, ~6 min a run measured;
# ResNet-20 uses 2%); 50% only (a second budget would double the time of the 50% phases); the
# greedy runs last on its side of phase 1, so that an interrupted session has finished the
# cheaper width arms.
ARMS=${ARMS:-uniform,wsp,tp_global,greedy,random,search,search_widths} \
BASE_EPOCHS=${BASE_EPOCHS:-10} GREEDY_STEP=${GREEDY_STEP:-0.05} SECOND_BUDGET=${SECOND_BUDGET-} \
    exec "$(dirname "$0")/fashion_mnist.sh" resnet56 "$@"
