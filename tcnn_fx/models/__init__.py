"""Model definitions the command line can build by name (``cifar:resnet20`` ...)."""

from tcnn_fx.models.cifar_resnet import CIFAR_DEPTHS, cifar_resnet

__all__ = ["CIFAR_DEPTHS", "cifar_resnet"]
