#!/usr/bin/env bash
# README results: Fashion-MNIST, ResNet-20 (10.3M FLOPs dense at 16x16); see fashion_mnist.sh.
exec "$(dirname "$0")/fashion_mnist.sh" resnet20 "$@"
