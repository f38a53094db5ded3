"""Probabilistic Conceptual Explainers: Trustworthy Conceptual Explanations for Vision Foundation Models (Wang,
Xu, Li, Wang, Wang; ICML 2024, arXiv:2406.12649), written from the paper and checked against the official code
(github.com/Wang-ML-Lab/interpretable-foundation-models, ``src/model.py``, ``src/utils.py``, ``src/config.py``,
``src/generate_data.py``); our own code, on CPU and on the course ViT.

A concept is a Gaussian in a small embedding space; an image is a mixture of concepts, its patches the draws:

    per image   θ ~ Dir(α)                                  (concept proportions)
    per token   z_n ~ Cat(θ),  e_n ~ N(μ_{z_n}, Σ_{z_n})     (e_n = a linear map of the token's hidden state)
    prediction  y ~ softmax(η φ̄)                            (the ViT's softmax, tied to the mean assignment)

    E-step (10 rounds)   φ_nk ∝ w_n exp(E[log θ_k] − ½ (e_n − μ_k)ᵀ Σ_k⁻¹ (e_n − μ_k) / 100) / √|Σ_k|,
                         γ = α + Σ_n φ_n
    M-step               attention-weighted means and covariances, a running average (ρ = 0.75), then a
                         prior towards (μ0, I) with strength n0 = 500; η one gradient step

    pace = PACE(in_dim=vit.embed_dim, num_classes=2, K=8, c_dim=4)
    pace.fit(vit, images)                                   # em_step over batches (and η from the ViT's softmax)
    out = pace.explain(images, vit)                         # out["phi"] [B, T, K], out["theta"] [B, K], ...
    images, labels, cells = color_grid(64)                  # the paper's "Color" toy set, small

The hidden states are those of the official ``--layer -2`` (HF ``hidden_states[-2]``: the input of the last
block), projected by a linear map to ``c_dim`` (``ViTClassify.linear``); w_n is the last block's CLS attention
row averaged over heads (``frac.mean(1)[:, 0, :]``, ``--frac fix``). Every token takes part, the CLS token too
(the official N = 197 = CLS + 196 patches).

Our reading of the official code, and where we differ from it:
- Deviation: log-space. φ is computed as a softmax over k of log-terms in float64 (the official exponentiates in
  float32 and adds ε = 1e-50; where every term underflows it gets 1/K, we get the right largest term).
  √|Σ_k| enters as ½ log|Σ_k| (the official's √(|det| + ε)); Σ_k⁻¹ without its ε·I (1e-50, no effect).
- Note (as in the code): w_n multiplies all φ_nk of token n, so it cancels when φ_n is normalised over k; the
  attention acts through the M-step weights (and the loss), not through φ. We therefore leave it out of φ.
- Deviation: initialisation of γ. The official draws φ ~ Gamma(K, 1/K) per call (numpy's global RNG) and starts
  from γ = Σ_n φ_n; we start from its expectation, γ_k = N, unless ``gamma0`` is given.
- As in the code: the covariance of the M-step is taken around the *old* means; the running average is
  μ ← (μ ρ c + μ̂ (1 − ρ) B) / (c + (1 − ρ) B), c += (1 − ρ) B (B = images in the batch); then, with s the number
  of M-steps so far, μ ← (n0 μ0 + s μ) / (n0 + s), Λ = (n0 I + s Σ⁻¹) / (n0 + s), Σ ← (n0 I + s Λ⁻¹) / (n0 + s)
  (``posterior_mu_sigma``). μ0 is its own random draw (N(0, 10²)), like the initial μ. n0 = 0 switches the
  prior off.
- Note: that running average is not normalised (old weight ρc, new (1 − ρ)B, divided by c + (1 − ρ)B), so μ and
  Σ shrink towards 0 step after step (μ_t ≈ μ̂ / ((1 − ρ) t)); ``average="official"`` (default) keeps it,
  ``average="normalised"`` divides by ρc + (1 − ρ)B and sets c ← ρc + (1 − ρ)B (exponential forgetting).
- Deviation: a concept with no weight in a batch keeps its μ, Σ (the official divides 0 by ε and averages a zero
  mean and a zero covariance in, which can make Σ singular).
- η: stored [K, classes] (the official stores [classes, K]). The official step is
  η_c ← η_c − lr (p̄_c − softmax(η φ̄)_c) φ̄, class after class (each class sees the rows already updated), with
  p̄ the batch-mean ViT softmax and φ̄ the mean of φ over the batch and the tokens. That is a step *down* the
  log-likelihood Σ_c p̄_c log softmax(η φ̄)_c (its gradient is (p̄_c − s_c) φ̄); we follow the code by default
  and ``eta_ascent=True`` takes the step up, as the paper's ELBO asks.
- The loss (``loss``) is the official ``_delta``: B · mean(φ · ½ Mahalanobis) (no /100 there), differentiable in
  the embeddings, so it can train the projection (the official trains ``ViTClassify.linear`` with it, the ViT
  frozen). The official computes it with the φ from the start of the last E-round; we use the final φ.
- Not done: the contrastive E-step (``do_cl_e_step``: extra Adam-smoothed terms for faithfulness and for stability
  under augmentation) and the projection's training loop; the official HF ViT-B/16 at 224 px is replaced by the
  course ViT; the Color images are made at ``img_size`` directly (see ``color_grid``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from vitlab.checks import check_choice, check_cls_vit, check_int, check_ndim, check_number

__all__ = ["PACE", "pace_features", "color_grid", "COLORS", "COLOR_NAMES", "CLASS_COLORS"]

COLOR_NAMES = ("black", "red", "yellow", "blue", "green")
COLORS = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float32)
CLASS_COLORS = ((1, 2), (3, 4))  # class 0: red + yellow, class 1: blue + green (codes into COLOR_NAMES)


def color_grid(n: int, img_size: int = 32, seed: int = 0, noise: float = 0.1):
    """The official "Color" set (``generate_data.py``), small: a 2 × 2 grid of cells, 0–2 of them black (uniform),
    the others coloured alternately with the class's two colours in a random order of cells (so both colours are
    always there); class 0 red + yellow, class 1 blue + green. Gaussian noise (std ``noise``; the official
    ``random_noise`` has var 0.01) on the 2 × 2 cells, clipped to [0, 1], then a bilinear resize to ``img_size``
    (skimage ``resize``'s default order 1). Classes alternate and are then shuffled (the official makes as many of
    each). Returns images [n, 3, S, S] in [0, 1], labels [n], cell codes [n, 2, 2] (indices into COLOR_NAMES)."""
    fn = "color_grid"
    n, img_size = check_int(n, "n", fn), check_int(img_size, "img_size", fn, low=2)
    seed = check_int(seed, "seed", fn, low=0)
    noise = check_number(noise, "noise", fn, low=0.0)
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2)[torch.randperm(n, generator=g)]
    cells = torch.zeros(n, 4, dtype=torch.long)
    num_black = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        locs = torch.randperm(4, generator=g)[: 4 - int(num_black[i])]
        pair = CLASS_COLORS[int(labels[i])]
        for j, loc in enumerate(locs.tolist()):
            cells[i, loc] = pair[j % 2]
    cells = cells.view(n, 2, 2)
    small = COLORS[cells].permute(0, 3, 1, 2)  # [n, 3, 2, 2]
    small = (small + noise * torch.randn(small.shape, generator=g)).clamp(0, 1)
    images = F.interpolate(small, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, labels, cells


@torch.no_grad()
def pace_features(vit, images: Tensor):
    """(hidden [B, T, D], w [B, T], logits [B, classes]) from a course ViT: the hidden states entering the last
    block (official ``--layer -2``), the last block's CLS attention row averaged over heads, and the logits."""
    vit = check_cls_vit(vit, "pace_features")
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"pace_features: images must be a tensor [B, C, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    x = vit.embed(images)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    hidden = x
    x, sides = vit.blocks[-1](x, side=("cls",))
    w = sides["cls"].mean(1)  # [B, H, T] → [B, T]
    return hidden, w, vit.forward_head(vit.norm(x))


class PACE(nn.Module):
    """μ [K, c_dim], Σ [K, c_dim, c_dim], μ0, η [K, classes] as float64 buffers; ``proj`` the linear map of the
    ViT's hidden states to c_dim. Official defaults: K = 100, c_dim = 25, α = 2, ρ = 0.75, n0 = 500, 10 E-rounds,
    Mahalanobis / 100, lr(η) = 1e-2."""

    def __init__(self, in_dim: int, num_classes: int, K: int = 100, c_dim: int = 25, alpha: float = 2.0,
                 rho: float = 0.75, n0: float = 500.0, e_iters: int = 10, spd_scale: float = 100.0,
                 eta_lr: float = 1e-2, eta_ascent: bool = False, average: str = "official", seed: int = 0):
        super().__init__()
        fn = "PACE"
        in_dim, self.num_classes = check_int(in_dim, "in_dim", fn), check_int(num_classes, "num_classes", fn)
        self.K, self.c_dim = check_int(K, "K", fn), check_int(c_dim, "c_dim", fn)
        self.alpha = check_number(alpha, "alpha", fn, low=0.0, low_open=True)
        self.rho = check_number(rho, "rho", fn, low=0.0, high=1.0, high_open=True)
        self.n0 = check_number(n0, "n0", fn, low=0.0)
        self.e_iters = check_int(e_iters, "e_iters", fn)
        self.spd_scale = check_number(spd_scale, "spd_scale", fn, low=0.0, low_open=True)
        self.eta_lr = check_number(eta_lr, "eta_lr", fn, low=0.0)
        self.eta_ascent = bool(eta_ascent)
        self.average = check_choice(average, ("official", "normalised"), "average", fn)
        g = torch.Generator().manual_seed(check_int(seed, "seed", fn, low=0))
        self.proj = nn.Linear(in_dim, self.c_dim)
        d64 = dict(dtype=torch.float64)
        self.register_buffer("mu", torch.randn(self.K, self.c_dim, generator=g, **d64) * 10)
        self.register_buffer("mu0", torch.randn(self.K, self.c_dim, generator=g, **d64) * 10)
        self.register_buffer("sigma", torch.eye(self.c_dim, **d64).repeat(self.K, 1, 1))
        self.register_buffer("eta", torch.randn(self.K, self.num_classes, generator=g, **d64))
        self.register_buffer("count", torch.zeros((), **d64))  # the official _cnt
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # the official _snum
        self.converged = False

    # ---------------------------------------------------------------- checks
    def _check_inputs(self, emb, w, fn: str):
        check_ndim(emb, 3, "embeddings", fn)
        if emb.shape[-1] != self.c_dim:
            raise ValueError(f"{fn}: embeddings must be [B, N, c_dim={self.c_dim}], got {tuple(emb.shape)}")
        check_ndim(w, 2, "weights", fn)
        if w.shape != emb.shape[:2]:
            raise ValueError(f"{fn}: weights must be [B, N] = {list(emb.shape[:2])}, got {tuple(w.shape)}")
        if (w < 0).any() or not torch.isfinite(w).all():
            raise ValueError(f"{fn}: weights must be finite and >= 0")
        return emb.to(torch.float64), w.to(torch.float64)

    # ---------------------------------------------------------------- model
    def mahalanobis(self, emb: Tensor) -> Tensor:
        """½ (e − μ_k)ᵀ Σ_k⁻¹ (e − μ_k) [B, N, K] (differentiable in ``emb``)."""
        diff = emb.to(torch.float64).unsqueeze(-2) - self.mu  # [B, N, K, c]
        return 0.5 * torch.einsum("bnkc,kcd,bnkd->bnk", diff, torch.linalg.inv(self.sigma), diff)

    @torch.no_grad()
    def e_step(self, embeddings: Tensor, weights: Tensor, gamma0: Tensor | None = None):
        """(φ [B, N, K], γ [B, K]) after ``e_iters`` rounds (official ``do_e_step``); ``gamma0`` [B, K] the start
        (default γ_k = N)."""
        emb, w = self._check_inputs(embeddings, weights, "PACE.e_step")
        B, N, _ = emb.shape
        if gamma0 is None:
            gamma = torch.full((B, self.K), float(N), dtype=torch.float64)
        else:
            check_ndim(gamma0, 2, "gamma0", "PACE.e_step")
            if gamma0.shape != (B, self.K) or (gamma0 <= 0).any():
                raise ValueError(f"PACE.e_step: gamma0 must be positive [B, K] = {[B, self.K]}, "
                                 f"got {tuple(gamma0.shape)}")
            gamma = gamma0.to(torch.float64)
        # w_n is a common factor of φ_n1 … φ_nK: it cancels in the normalisation (see the module notes)
        base = -self.mahalanobis(emb) / self.spd_scale - 0.5 * torch.linalg.slogdet(self.sigma).logabsdet
        for _ in range(self.e_iters):
            elog = torch.digamma(gamma) - torch.digamma(gamma.sum(-1, keepdim=True))  # E[log θ]
            phi = torch.softmax(elog.unsqueeze(1) + base, dim=-1)
            gamma = self.alpha + phi.sum(1)
        return phi, gamma

    @torch.no_grad()
    def m_step(self, embeddings: Tensor, weights: Tensor, phi: Tensor) -> None:
        """μ, Σ from φ (official second half of ``do_em_step``): weighted estimates, running average, prior."""
        emb, w = self._check_inputs(embeddings, weights, "PACE.m_step")
        B = emb.shape[0]
        if not isinstance(phi, Tensor) or phi.shape != emb.shape[:2] + (self.K,):
            raise ValueError(f"PACE.m_step: phi must be [B, N, K] = {list(emb.shape[:2]) + [self.K]}")
        x = emb.reshape(-1, self.c_dim)
        r = (phi.to(torch.float64) * w.unsqueeze(-1)).reshape(-1, self.K)  # w_n φ_nk [BN, K]
        mass = r.sum(0)  # [K]
        has = mass > 0
        safe = torch.where(has, mass, torch.ones_like(mass))
        mu_hat = (r.T @ x) / safe[:, None]
        diff = x.unsqueeze(1) - self.mu  # around the old means, as the official
        sigma_hat = torch.einsum("nk,nkc,nkd->kcd", r, diff, diff) / safe[:, None, None]
        mu_hat = torch.where(has[:, None], mu_hat, self.mu)
        sigma_hat = torch.where(has[:, None, None], sigma_hat, self.sigma)
        new_w = (1 - self.rho) * B
        last = self.mu.clone()
        old_w = self.rho * self.count
        total = self.count + new_w if self.average == "official" else old_w + new_w
        mu = (self.mu * old_w + mu_hat * new_w) / total
        sigma = (self.sigma * old_w + sigma_hat * new_w) / total
        self.count.copy_(total if self.average == "normalised" else self.count + new_w)
        self.steps += 1
        s, n0 = float(self.steps), self.n0
        eye = torch.eye(self.c_dim, dtype=torch.float64)
        mu = (n0 * self.mu0 + s * mu) / (n0 + s)
        lam = (n0 * eye + s * torch.linalg.inv(sigma)) / (n0 + s)
        sigma = (n0 * eye + s * torch.linalg.inv(lam)) / (n0 + s)
        self.mu.copy_(mu)
        self.sigma.copy_(sigma)
        self.converged = bool((last - self.mu).abs().max() < 1e-5)

    @torch.no_grad()
    def update_eta(self, logits: Tensor, phi: Tensor) -> None:
        """One η step (official ``update_eta``; sign: see the module notes)."""
        check_ndim(logits, 2, "logits", "PACE.update_eta")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"PACE.update_eta: logits must be [B, {self.num_classes}], got {tuple(logits.shape)}")
        p = torch.softmax(logits.to(torch.float64), -1).mean(0)  # [C]
        fbar = phi.to(torch.float64).mean((0, 1))  # [K]
        sign = 1.0 if self.eta_ascent else -1.0
        for c in range(self.num_classes):  # class after class, as the official loop
            s = torch.softmax(fbar @ self.eta, -1)[c]
            self.eta[:, c] += sign * self.eta_lr * (p[c] - s) * fbar

    def em_step(self, embeddings: Tensor, weights: Tensor, logits: Tensor | None = None,
                gamma0: Tensor | None = None):
        """E-step, M-step and (with ``logits``) one η step; returns (φ, γ) of the E-step."""
        phi, gamma = self.e_step(embeddings, weights, gamma0)
        self.m_step(embeddings, weights, phi)
        if logits is not None:
            self.update_eta(logits, phi)
        return phi, gamma

    def loss(self, embeddings: Tensor, phi: Tensor) -> Tensor:
        """The official ``_delta``: B · mean(φ · ½ Mahalanobis), differentiable in the embeddings."""
        return (phi.detach() * self.mahalanobis(embeddings)).mean() * embeddings.shape[0]

    def predict_proba(self, phi: Tensor) -> Tensor:
        """softmax(η φ̄) [B, classes] with φ̄ the per-image mean of φ."""
        return torch.softmax(phi.to(torch.float64).mean(1) @ self.eta, -1)

    # ---------------------------------------------------------------- on a ViT
    def embed(self, vit, images: Tensor):
        """(embeddings [B, T, c_dim] float64, w [B, T], logits) of ``images`` under ``vit``."""
        hidden, w, logits = pace_features(vit, images)
        with torch.no_grad():
            emb = self.proj(hidden.to(self.proj.weight.dtype)).to(torch.float64)
        return emb, w, logits

    def fit(self, vit, images: Tensor, epochs: int = 1, batch_size: int = 32, use_logits: bool = True) -> "PACE":
        """``em_step`` over ``images`` in order, ``epochs`` times (the ViT and the projection frozen)."""
        epochs, batch_size = check_int(epochs, "epochs", "PACE.fit"), check_int(batch_size, "batch_size", "PACE.fit")
        for _ in range(epochs):
            for i in range(0, len(images), batch_size):
                emb, w, logits = self.embed(vit, images[i:i + batch_size])
                self.em_step(emb, w, logits if use_logits else None)
        return self

    def explain(self, images: Tensor, vit) -> dict:
        """φ [B, T, K] (T = CLS + patches), γ [B, K], θ = γ / Σγ [B, K] (the image's concept proportions), the
        most likely concept per patch on the grid [B, gh, gw], and the ViT's logits."""
        emb, w, logits = self.embed(vit, images)
        phi, gamma = self.e_step(emb, w)
        gh, gw = vit.grid_size
        concepts = phi[:, vit.num_prefix_tokens:].argmax(-1).reshape(len(images), gh, gw)
        return {"phi": phi, "gamma": gamma, "theta": gamma / gamma.sum(-1, keepdim=True), "weights": w,
                "patch_concepts": concepts, "logits": logits}
