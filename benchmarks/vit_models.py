"""Small Vision Transformers for 32x32 images, as ``tcnn-fx`` model specs (``benchmarks/vit_models.py:vit_cifar``).

timm's ``VisionTransformer`` with 4x4 patches (an 8x8 token grid plus a class
token), 128 wide, 6 blocks of 4 heads, MLP ratio 2: small enough to train from
scratch on two CPU cores in minutes per epoch.  ``vit_cifar_9heads`` has one
head per tap of a 3x3 window.
"""

from timm.models.vision_transformer import VisionTransformer


def vit_cifar(num_classes: int = 10) -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2, num_classes=num_classes
    )


def vit_cifar_9heads(num_classes: int = 10) -> VisionTransformer:
    """As ``vit_cifar`` with 9 heads of 16 (144 wide): one head per tap of a 3x3 window."""
    return VisionTransformer(
        img_size=32, patch_size=4, embed_dim=144, depth=6, num_heads=9, mlp_ratio=2, num_classes=num_classes
    )
