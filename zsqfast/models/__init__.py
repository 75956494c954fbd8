"""Model builders: the checkpoint-compatible CIFAR ResNets and timm / torchvision models by name."""
from ..data import CIFAR_MEAN, CIFAR_STD, normalize
from .cifar_resnet import CifarResNet, cifar_resnet, load_cifar_resnet
from .zoo import build

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "CifarResNet", "build", "cifar_resnet", "load_cifar_resnet", "normalize"]
