"""Models by name: CIFAR ResNets/VGG and every torchvision classifier (random init only)."""

from .cifar import (
    BasicBlock,
    CifarResNet,
    CifarVGG,
    resnet20,
    resnet32,
    resnet56,
    resnet110,
    vgg16_bn,
)
from .registry import TORCHVISION_PREFIX, arch_of, available, create

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "TORCHVISION_PREFIX",
    "arch_of",
    "available",
    "create",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "vgg16_bn",
]
