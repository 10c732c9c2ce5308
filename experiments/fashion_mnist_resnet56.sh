#!/usr/bin/env bash
# README results: Fashion-MNIST, ResNet-56 (about 3x ResNet-20's FLOPs); see fashion_mnist.sh.
exec "$(dirname "$0")/fashion_mnist.sh" resnet56 "$@"
