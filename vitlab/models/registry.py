"""Named model configurations: ``create_model("vit_tiny", img_size=32, in_chans=3)``.

| name       | depth × width | heads | mlp | params (28 px, 10 classes) | for                          |
| ---------- | ------------- | ----- | --- | -------------------------- | ---------------------------- |
| vit_nano   | 4 × 64        | 4     | 2   | ~0.14 M                    | smoke-sized experiments      |
| vit_tiny   | 6 × 96        | 3     | 2   | ~0.46 M                    | the course's base model (CPU)|
| vit_small  | 12 × 192      | 3     | 4   | ~5.4 M                     | DeiT-Ti widths, GPU profile  |
| vit_s16    | 12 × 384      | 6     | 4   | ~22 M  (224 px, patch 16)  | ViT-S/16, benchmarks         |
"""
from __future__ import annotations

from typing import Any, Callable

from .vit import VisionTransformer

__all__ = ["MODELS", "register_model", "create_model", "model_config", "builder"]

MODELS: dict[str, dict[str, Any]] = {}
_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_model(name: str, builder: Callable[..., Any] = VisionTransformer, **config):
    """Register a named configuration (timm's registry, without the decorator magic)."""
    if name in MODELS:
        raise ValueError(f"register_model: {name!r} is already registered")
    MODELS[name] = dict(config)
    _BUILDERS[name] = builder


register_model("vit_nano", img_size=28, patch_size=4, in_chans=1, num_classes=10,
               embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
register_model("vit_tiny", img_size=28, patch_size=4, in_chans=1, num_classes=10,
               embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0)
register_model("vit_small", img_size=32, patch_size=4, in_chans=3, num_classes=100,
               embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, drop_path_rate=0.1)
register_model("vit_s16", img_size=224, patch_size=16, in_chans=3, num_classes=1000,
               embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.1)


def builder(name: str) -> Callable[..., Any]:
    """The class or function that builds the registered model ``name`` from its config."""
    model_config(name)  # the same clear error for an unknown name
    return _BUILDERS[name]


def model_config(name: str, data=None, **overrides) -> dict[str, Any]:
    """The keyword arguments ``create_model`` would build ``name`` with."""
    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a str, got {type(name).__name__}")
    if name not in MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; valid models are {sorted(MODELS)}")
    cfg = dict(MODELS[name])
    if data is not None:  # take the input and label shapes from a vitlab.data.ImageDataset
        missing = [a for a in ("img_size", "in_chans", "num_classes") if not hasattr(data, a)]
        if missing:
            raise TypeError(f"create_model: data must be a vitlab ImageDataset (lacks {missing})")
        cfg.update(img_size=data.img_size, in_chans=data.in_chans, num_classes=data.num_classes)
    cfg.update(overrides)
    return cfg


def create_model(name: str, data=None, **overrides):
    """Build a registered model; ``data`` (an ImageDataset) sets img_size, in_chans and num_classes.

    The active profile decides ``use_kernels`` unless given (the Triton kernels run only on CUDA tensors).
    """
    cfg = model_config(name, data, **overrides)
    if _BUILDERS[name] is VisionTransformer and "use_kernels" not in cfg:
        from vitlab.profiles import profile

        cfg["use_kernels"] = profile().kernels  # Triton on CUDA in the gpu profile; model.set_kernels(False) opts out
    try:
        return _BUILDERS[name](**cfg)
    except TypeError as e:  # an override the constructor does not know
        raise TypeError(f"create_model({name!r}): {e}") from None
