"""A tiny course ViT for unit tests: 16 px RGB, patch 4 (16 patches + CLS), width 32, 2 blocks, 2 heads."""
import torch

from vitlab.models import VisionTransformer


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """Seeded and in eval mode; any constructor argument can be overridden (num_classes=..., depth=...)."""
    torch.manual_seed(seed)
    cfg = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
               mlp_ratio=4.0)
    return VisionTransformer(**(cfg | overrides)).eval()
