"""Run profiles: one switch for how big every lesson runs.

    smoke  nbval and CI: every notebook under 60 s on 2 CPU cores, offline
    cpu    a laptop: each lesson a few minutes, offline
    gpu    CUDA: real datasets (downloads allowed), bigger models, bf16, Triton kernels

Chosen by ``profile(name)``, else ``$VITLAB_PROFILE``, else ``gpu`` when CUDA is present, else ``cpu``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use, so the CLIs answer --help at once
    import torch

__all__ = ["Profile", "PROFILES", "profile", "device"]


@dataclass(frozen=True)
class Profile:
    name: str
    model: str  # registry name of the lesson's default ViT (vitlab.models.create_model)
    max_train: int | None  # cap on training images (None: the whole split)
    epochs: int
    batch_size: int
    device: str
    amp_dtype: str | None  # autocast dtype on CUDA ("bfloat16") or None for fp32
    compile: bool  # torch.compile the model in vitlab.train.fit
    kernels: bool  # use vitlab.kernels (Triton) inside the models on CUDA
    allow_download: bool  # online datasets (CIFAR) through torchvision
    seeds: int  # how many seeds a lesson averages over when it reports a sweep
    notes: str = field(default="", compare=False)

    def replace(self, **changes) -> "Profile":
        """A copy with some fields changed, e.g. ``P.replace(epochs=2)``."""
        return dataclasses.replace(self, **changes)

    @property
    def amp(self) -> "torch.dtype | None":
        import torch

        return getattr(torch, self.amp_dtype) if self.amp_dtype else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", model="vit_nano", max_train=2000, epochs=4, batch_size=64, device="cpu",
        amp_dtype=None, compile=False, kernels=False, allow_download=False, seeds=1,
        notes="nbval/CI: each notebook < 60 s on 2 cores; numbers are a sanity check, not a result",
    ),
    "cpu": Profile(
        name="cpu", model="vit_tiny", max_train=None, epochs=30, batch_size=128, device="cpu",
        amp_dtype=None, compile=False, kernels=False, allow_download=False, seeds=3,
        notes="a laptop: each lesson at most ~5 minutes on 2 cores",
    ),
    "gpu": Profile(
        name="gpu", model="vit_small", max_train=None, epochs=100, batch_size=256, device="cuda",
        amp_dtype="bfloat16", compile=True, kernels=True, allow_download=True, seeds=3,
        notes="CUDA: CIFAR through torchvision, ViT-S widths, bf16 autocast, Triton kernels",
    ),
}


def profile(name: str | Profile | None = None) -> Profile:
    """The active profile: ``name``, else ``$VITLAB_PROFILE``, else ``gpu`` on CUDA, else ``cpu``."""
    if isinstance(name, Profile):
        return name
    if name is None:
        name = os.environ.get("VITLAB_PROFILE") or ("gpu" if _cuda() else "cpu")
    if not isinstance(name, str):
        raise TypeError(f"profile: expected a name (str) or a Profile, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in PROFILES:
        raise ValueError(f"profile: unknown profile {name!r}; valid profiles are {sorted(PROFILES)}")
    p = PROFILES[key]
    if p.device == "cuda" and not _cuda():
        raise ValueError(
            f"profile: {name!r} needs a CUDA device and none is available; use 'cpu' or 'smoke'"
        )
    return p


def device(p: Profile | None = None) -> "torch.device":
    """The one place lessons get their device from (never a hard-coded 'cuda')."""
    import torch

    return torch.device(profile(p).device)
