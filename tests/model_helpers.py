"""A tiny course ViT for unit tests: 16 px RGB, patch 4 (16 patches + CLS), width 32, 2 blocks, 2 heads."""
import torch

from vitlab.models import VisionTransformer


def tiny_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """Seeded and in eval mode; any constructor argument can be overridden (num_classes=..., depth=...)."""
    torch.manual_seed(seed)
    cfg = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=2,
               mlp_ratio=4.0)
    return VisionTransformer(**(cfg | overrides)).eval()


def toy_train(n: int = 64, num_classes: int = 5, img_size: int = 16, seed: int = 0):
    """A seeded ImageDataset of random 3-channel images and labels: enough for a method's ``for_compare`` to run."""
    from vitlab.data import ImageDataset

    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.rand(n, 3, img_size, img_size, generator=g),
                        torch.randint(0, num_classes, (n,), generator=g), name="toy", split="train",
                        classes=[str(c) for c in range(num_classes)])


def assert_rejects_bad_images(model, in_chans: int, img_size: int) -> None:
    """``model`` raises a ValueError naming in_chans / img_size / the image batch for wrong channels, a wrong size
    and a 3-D input."""
    import pytest

    with pytest.raises(ValueError, match=f"in_chans={in_chans}"):
        model(torch.randn(1, in_chans + 2, img_size, img_size))
    with pytest.raises(ValueError, match=f"img_size={img_size}"):
        model(torch.randn(1, in_chans, img_size + 4, img_size + 4))
    with pytest.raises(ValueError, match="image batch"):
        model(torch.randn(1, img_size, img_size))


def objective_losses(objective, model, images, idx, *, steps: int = 3, lr: float = 1e-3) -> list[float]:
    """Train ``model`` for ``steps`` AdamW steps with a zoo objective's ``step_fn`` on one fixed batch; the losses.
    Each step must return a finite loss and no logits (the objectives of chapter 7 report their own metrics)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, logits = objective.step_fn(model, images, idx)
        assert logits is None and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
