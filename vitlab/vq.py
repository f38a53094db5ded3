"""Vector quantisation: a codebook lookup with a straight-through gradient, and how much of the codebook is used.

VQ-VAE (van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning", NeurIPS 2017) and its
ViT-VQGAN refinement (Yu, Li, Koh, Zhang, Pang, Qin, Ku, Xu, Baldridge, Wu, "Vector-quantized Image Modeling
with Improved VQGAN", ICLR 2022, arXiv:2110.04627, Sec. 3.2 "Codebook learning").

    z [.., dim] ─(factorized: Linear → code_dim)→ u ─(l2_normalized: u/‖u‖, codebook e_k/‖e_k‖)→
    k* = argmin_k ‖u − e_k‖²                          (on unit vectors: argmax_k cos(u, e_k))
    u_q = e_k*;  forward value u_q, gradient of u:  u + sg(u_q − u)      straight-through estimator
    out = (factorized: Linear → dim)(u + sg(u_q − u))
    loss = ‖sg(u) − u_q‖² + β ‖u − sg(u_q)‖²          codebook term + β · commitment term (means over elements)

ViT-VQGAN's two changes against codebook collapse (few codes used): look codes up in a low-dimensional space
(768 → 32 or 8 dims: "factorized codes") and compare l2-normalised vectors (cosine similarity). With both, the
paper reports far better codebook usage and reconstruction; ``codebook_usage`` measures the first.

No official ViT-VQGAN code was released. We follow the paper and, for details it leaves open, the taming-
transformers quantiser (CompVis/taming-transformers ``taming/modules/vqvae/quantize.py::VectorQuantizer2``)
and its ViT-VQGAN port thuanz123/enhancing-transformers (``enhancing/modules/stage1/quantizers.py``, with the
projections in ``vitvqgan.py``); lucidrains/vector-quantize-pytorch (``VectorQuantize(codebook_dim=…,
use_cosine_sim=True)``) does the same lookup but updates its codebook by EMA by default. Our code is our own.
Choices, named:
- codebook init uniform(−1/K, 1/K), as taming and thuanz123;
- β on the commitment term, as the VQ-VAE and ViT-VQGAN papers; ``legacy=True`` puts β on the codebook term
  instead (taming's ``legacy=True`` default, and thuanz123), to compare against those codes;
- the straight-through estimator passes the gradient to the (normalised, projected) lookup vector u, whose
  graph leads back to z; thuanz123 passes it to the unnormalised z directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitlab.checks import check_int, check_number

__all__ = ["VectorQuantizer", "codebook_usage"]


class VectorQuantizer(nn.Module):
    """``forward(z [..., dim]) -> (quantized [..., dim], indices [...] int64, loss scalar)``.

    num_codes: codebook size K.  dim: width of z.  beta: commitment weight (0.25 in VQ-VAE and ViT-VQGAN).
    factorized: look up in a ``code_dim``-dim space (Linear ``proj_in`` dim → code_dim, Linear ``proj_out`` back;
      default code_dim 8). Without it the codebook has ``dim`` columns and ``code_dim`` must not be given.
    l2_normalized: normalise the lookup vectors and the codebook (cosine lookup; quantized values are unit codes).
    legacy: β on the codebook term instead of the commitment term (taming's legacy default, thuanz123).
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, factorized: bool = False,
                 code_dim: int | None = None, l2_normalized: bool = False, legacy: bool = False):
        super().__init__()
        fn = "VectorQuantizer"
        self.num_codes = check_int(num_codes, "num_codes", fn)
        self.dim = check_int(dim, "dim", fn)
        self.beta = check_number(beta, "beta", fn, low=0)
        for name, val in (("factorized", factorized), ("l2_normalized", l2_normalized), ("legacy", legacy)):
            if not isinstance(val, bool):
                raise TypeError(f"{fn}: {name} must be a bool, got {val!r}")
        if code_dim is not None and not factorized:
            raise ValueError(f"{fn}: code_dim={code_dim!r} needs factorized=True (the plain codebook has dim={dim} "
                             f"columns)")
        self.factorized, self.l2_normalized, self.legacy = factorized, l2_normalized, legacy
        self.code_dim = check_int(8 if code_dim is None else code_dim, "code_dim", fn) if factorized else dim
        self.proj_in = nn.Linear(dim, self.code_dim) if factorized else nn.Identity()
        self.proj_out = nn.Linear(self.code_dim, dim) if factorized else nn.Identity()
        self.codebook = nn.Embedding(self.num_codes, self.code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / self.num_codes, 1.0 / self.num_codes)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_normalized else x

    def codes(self) -> torch.Tensor:
        """The codebook as the lookup sees it [K, code_dim] (unit rows when ``l2_normalized``)."""
        return self._norm(self.codebook.weight)

    def _check(self, z) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim < 1 or z.shape[-1] != self.dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"VectorQuantizer: z must be a tensor [..., dim={self.dim}], got {shape}")
        if not z.dtype.is_floating_point:
            raise TypeError(f"VectorQuantizer: z must be floating point, got {z.dtype}")
        return z

    def lookup(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest code (squared l2) of each lookup vector u [..., code_dim] → indices [...]; first on ties."""
        e = self.codes()
        flat = u.reshape(-1, self.code_dim).float()
        ef = e.float()
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ ef.t() + ef.pow(2).sum(1)[None]  # [M, K]
        return d.argmin(dim=1).reshape(u.shape[:-1])

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., dim] → code indices [...]."""
        with torch.no_grad():
            return self.lookup(self._norm(self.proj_in(self._check(z))))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [...] → quantized vectors [..., dim] (what ``forward`` returns for them)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"VectorQuantizer.decode: indices must be an integer tensor, got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"VectorQuantizer.decode: indices must be in 0..{self.num_codes - 1}, got "
                             f"{int(indices.min())}..{int(indices.max())}")
        return self.proj_out(self.codes()[indices.long()])

    def forward(self, z: torch.Tensor):
        u = self._norm(self.proj_in(self._check(z)))  # the lookup vector
        indices = self.lookup(u.detach())
        u_q = self.codes()[indices].to(u.dtype)
        codebook_term = F.mse_loss(u_q, u.detach())  # moves the codes towards the encoder
        commit_term = F.mse_loss(u, u_q.detach())  # keeps the encoder near its code
        loss = (self.beta * codebook_term + commit_term) if self.legacy else (codebook_term + self.beta * commit_term)
        quantized = self.proj_out(u + (u_q - u).detach())  # value u_q, gradient straight through to u
        return quantized, indices, loss

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, code_dim={self.code_dim}, beta={self.beta:g}, "
                f"factorized={self.factorized}, l2_normalized={self.l2_normalized}, legacy={self.legacy}")


@torch.no_grad()
def codebook_usage(indices: torch.Tensor, num_codes: int) -> dict:
    """How evenly codes are used: ``perplexity`` = exp(entropy of the code histogram) (K when all K codes are
    used equally often, 1 when one code takes everything), ``used`` = fraction of the K codes used at least once,
    ``counts`` [K] int64."""
    fn = "codebook_usage"
    num_codes = check_int(num_codes, "num_codes", fn)
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"{fn}: indices must be an integer tensor, got "
                        f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.numel() == 0:
        raise ValueError(f"{fn}: indices is empty")
    flat = indices.reshape(-1).long().cpu()
    lo, hi = int(flat.min()), int(flat.max())
    if lo < 0 or hi >= num_codes:
        raise ValueError(f"{fn}: indices must be in 0..{num_codes - 1} (num_codes={num_codes}), got {lo}..{hi}")
    counts = torch.bincount(flat, minlength=num_codes)
    p = counts.double() / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {"perplexity": math.exp(entropy), "used": float((counts > 0).double().mean()), "counts": counts}
