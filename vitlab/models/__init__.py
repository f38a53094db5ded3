"""Models: a timm-compatible ViT with inspectable attention, shared attention layers, and a registry."""
from .cnn import SmallCNN, small_cnn
from .layers import CrossAttention, WindowAttention, window_partition, window_reverse
from .registry import MODELS, create_model, model_config, register_model
from .vit import SIDE_OUTPUTS, Attention, Block, PatchEmbed, VisionTransformer, init_linear_

__all__ = ["PatchEmbed", "Attention", "Block", "VisionTransformer", "SIDE_OUTPUTS", "CrossAttention",
           "WindowAttention", "window_partition", "window_reverse", "MODELS", "create_model", "model_config",
           "register_model", "SmallCNN", "small_cnn", "init_linear_"]
