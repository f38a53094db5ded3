"""PACE: a hand-checked E-step, what the attention weights do (nothing to φ, everything to the M-step), EM finding
cluster means, agreement with numbers from the official code, the Color set's rule, the ViT plumbing, bad input."""
import math

import pytest
import torch

from tests.model_helpers import tiny_vit
from vitlab.methods.robustness import pace as P

F64 = torch.float64


def _pace(K, c_dim, **kw):
    return P.PACE(4, 2, K=K, c_dim=c_dim, **kw)


def test_e_step_hand_checked():
    p = _pace(2, 2)
    p.mu.copy_(torch.tensor([[0.0, 0.0], [20.0, 0.0]], dtype=F64))
    p.sigma.copy_(torch.stack([torch.eye(2), 4 * torch.eye(2)]).to(F64))
    emb = torch.zeros(1, 1, 2)
    # one round from equal γ: log-terms 0 and -(½·400/4)/100 - ½ log 16
    p.e_iters = 1
    phi, gamma = p.e_step(emb, torch.ones(1, 1), gamma0=torch.ones(1, 2))
    r = math.exp(-0.5) / 4
    assert phi[0, 0, 1].item() == pytest.approx(r / (1 + r), rel=1e-12)
    assert torch.allclose(gamma, 2.0 + phi.sum(1))


def test_e_step_points_at_means_are_one_hot():
    p = _pace(2, 2, alpha=2.0)
    p.mu.copy_(torch.tensor([[-50.0, 0.0], [50.0, 0.0]], dtype=F64))
    emb = torch.tensor([[[-50.0, 0.0], [50.0, 0.0], [50.0, 0.0]]])
    phi, gamma = p.e_step(emb, torch.full((1, 3), 1 / 3))
    assert torch.allclose(phi[0], torch.tensor([[1.0, 0], [0, 1], [0, 1]], dtype=F64), atol=1e-9)
    assert torch.allclose(gamma, 2.0 + phi.sum(1)) and torch.allclose(gamma, torch.tensor([[3.0, 4.0]], dtype=F64))


def test_weights_cancel_in_phi_and_weigh_the_m_step():
    g = torch.Generator().manual_seed(1)
    p = _pace(3, 2, seed=1)
    emb, w = torch.randn(2, 6, 2, generator=g) * 10, torch.rand(2, 6, generator=g)
    phi, _ = p.e_step(emb, w)
    phi2, _ = p.e_step(emb, w * torch.rand(2, 6, generator=g) * 7)  # w_n is a common factor of φ_n·
    assert torch.allclose(phi, phi2)
    # K = 1, no prior, no history: μ = Σ w x / Σ w, Σ around the old μ = 0
    q = _pace(1, 2, n0=0.0)
    q.mu.zero_()
    x = torch.tensor([[[0.0, 1], [0, -1], [4, 1], [4, -1]]])
    q.em_step(x, torch.tensor([[3.0, 3, 1, 1]]))
    assert torch.allclose(q.mu, torch.tensor([[1.0, 0.0]], dtype=F64))
    assert torch.allclose(q.sigma, torch.tensor([[[4.0, 0.0], [0.0, 1.0]]], dtype=F64))


def test_em_recovers_cluster_means():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[-40.0, 0.0], [40.0, 0.0], [0.0, 50.0]], dtype=F64)
    p = _pace(3, 2, n0=0.0, average="normalised", spd_scale=1.0)  # official average shrinks μ (module notes)
    # a start near the truth: the covariance is taken around the old means (as the official), so a far start
    # inflates Σ, and with the official Mahalanobis / 100 the concepts blur (spd_scale=1 here keeps them crisp)
    p.mu.copy_(true + torch.randn(3, 2, generator=g, dtype=F64))
    for _ in range(15):
        z = torch.randint(0, 3, (4, 30), generator=g)
        emb = true[z] + torch.randn(4, 30, 2, generator=g, dtype=F64)
        p.em_step(emb, torch.rand(4, 30, generator=g, dtype=F64) + 0.1)
    assert (p.mu - true).abs().max() < 0.5
    assert torch.allclose(p.sigma, torch.eye(2, dtype=F64).expand(3, 2, 2), atol=0.6)


def _official_case():
    g = torch.Generator().manual_seed(0)
    f = dict(generator=g, dtype=F64)
    emb = torch.randn(2, 5, 2, **f) * 2
    w = torch.softmax(torch.randn(2, 5, **f), -1)
    mus = torch.randn(3, 2, **f) * 2
    A = torch.randn(3, 2, 2, **f)
    sig = A @ A.transpose(1, 2) + 0.5 * torch.eye(2, dtype=F64)
    mu0, eta = torch.randn(3, 2, **f), torch.randn(2, 3, **f)
    gamma0 = (torch.rand(2, 5, 3, **f) + 0.5).sum(1)  # the official init φ (its random.gamma replaced by this)
    logits = torch.randn(2, 2, **f)
    return emb.float(), w.float(), mus, sig, mu0, eta, gamma0, logits


@pytest.mark.parametrize("n0", [1.0, 500.0])
def test_agrees_with_the_official_code(n0):
    # Expected numbers: the official src/model.py PACE (do_e_step, do_em_step, update_eta) run on CPU (.cuda()
    # removed, random.gamma returning the φ whose sum over tokens is gamma0 above, args.frac='fix' with frac[:, 0,
    # 0, :] = w, posterior_mu_sigma's n0 = 1 or its default 500) on this seeded input: K=3, d=2, N=5, B=2, C=2.
    # Sequence: do_e_step; do_em_step; update_eta(logits); do_em_step.
    emb, w, mus, sig, mu0, eta, gamma0, logits = _official_case()
    p = P.PACE(4, 2, K=3, c_dim=2, n0=n0)
    p.mu.copy_(mus), p.sigma.copy_(sig), p.mu0.copy_(mu0), p.eta.copy_(eta.T)
    phi, gamma = p.e_step(emb, w, gamma0)
    assert torch.allclose(phi[0, 0], torch.tensor([0.284964, 0.4819, 0.233137], dtype=F64), atol=1e-5)
    assert torch.allclose(gamma, torch.tensor([[3.255875, 4.559929, 3.184196], [3.168392, 4.636605, 3.195003]],
                                              dtype=F64), atol=1e-5)
    phi1, _ = p.em_step(emb, w, gamma0=gamma0)
    if n0 == 500.0:
        assert torch.allclose(p.mu, torch.tensor([[-0.459391, -0.333416], [-1.568675, 1.231109],
                                                  [1.390028, 1.170708]], dtype=F64), atol=1e-5)
        return
    assert torch.allclose(p.mu, torch.tensor([[-0.7078009, 0.308309], [-1.2416194, 1.1334134],
                                              [0.2412698, 1.0722555]], dtype=F64), atol=1e-5)
    assert torch.allclose(p.sigma[1], torch.tensor([[1.4507074, -0.0632214], [-0.0632214, 1.2173933]],
                                                   dtype=F64), atol=1e-5)
    p.update_eta(logits, phi1)
    assert torch.allclose(p.eta.T, torch.tensor([[0.4329014, -1.735559, -1.3366478],
                                                 [0.8877069, 0.7692669, 0.0577125]], dtype=F64), atol=1e-5)
    p.em_step(emb, w, gamma0=gamma0)
    assert torch.allclose(p.mu, torch.tensor([[-0.6376106, 0.2951276], [-1.1462722, 1.0306221],
                                              [0.2216805, 0.9928036]], dtype=F64), atol=1e-5)
    assert torch.allclose(p.sigma[2], torch.tensor([[1.3706952, -0.0978622], [-0.0978622, 1.2963628]],
                                                   dtype=F64), atol=1e-5)
    assert p.count.item() == 1.0 and p.steps.item() == 2


def test_eta_ascent_raises_the_likelihood():
    p = _pace(3, 2, eta_ascent=True, eta_lr=0.5)
    phi = torch.softmax(torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0)), -1)
    logits = torch.tensor([[4.0, -4.0], [3.0, -3.0]])
    target = torch.softmax(logits.double(), -1).mean(0)
    before = (target * p.predict_proba(phi).mean(0).log()).sum()
    p.update_eta(logits, phi)
    assert (target * p.predict_proba(phi).mean(0).log()).sum() > before


def test_color_grid_rule_and_reproducible():
    images, labels, cells = P.color_grid(40, img_size=8, seed=3)
    assert images.shape == (40, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert labels.bincount().tolist() == [20, 20]
    for lab, c in zip(labels.tolist(), cells.view(40, 4).tolist()):
        colours = [k for k in c if k != 0]
        assert 2 <= len(colours) <= 4 and set(colours) == set(P.CLASS_COLORS[lab])
    again = P.color_grid(40, img_size=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((images, labels, cells), again))
    assert not torch.equal(images, P.color_grid(40, img_size=8, seed=4)[0])
    clean, _, cells = P.color_grid(10, img_size=8, noise=0.0)
    assert torch.equal(clean[:, :, 0, 0], P.COLORS[cells[:, 0, 0]])  # a corner pixel is its cell's colour


def test_on_a_vit():
    vit = tiny_vit()  # 16 px, 4 px patches: CLS + 16 tokens
    x, _, _ = P.color_grid(6, img_size=16)
    hidden, w, logits = P.pace_features(vit, x)
    _, sides = vit(x, side=("cls",))
    assert hidden.shape == (6, 17, 32) and torch.allclose(w, sides[-1]["cls"].mean(1))
    assert torch.allclose(logits, vit(x), atol=1e-6)
    p = P.PACE(32, 5, K=4, c_dim=3).fit(vit, x, batch_size=3)
    assert p.steps.item() == 2
    out = p.explain(x, vit)
    assert out["phi"].shape == (6, 17, 4) and out["patch_concepts"].shape == (6, 4, 4)
    assert torch.allclose(out["theta"].sum(-1), torch.ones(6, dtype=F64))
    emb = p.proj(hidden)
    p.loss(emb, out["phi"]).backward()
    assert p.proj.weight.grad is not None


def test_bad_input():
    p = _pace(3, 2)
    with pytest.raises(ValueError, match="embeddings"):
        p.e_step(torch.zeros(2, 5, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="weights"):
        p.e_step(torch.zeros(2, 5, 2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="weights"):
        p.em_step(torch.zeros(2, 5, 2), -torch.ones(2, 5))
    with pytest.raises(ValueError, match="gamma0"):
        p.e_step(torch.zeros(2, 5, 2), torch.ones(2, 5), gamma0=torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits"):
        p.update_eta(torch.zeros(2, 3), torch.ones(2, 5, 3))
    with pytest.raises(TypeError, match="K"):
        P.PACE(4, 2, K=2.5)
    with pytest.raises(ValueError, match="average"):
        P.PACE(4, 2, average="mean")
    with pytest.raises(ValueError, match="rho"):
        P.PACE(4, 2, rho=1.0)
    with pytest.raises(TypeError, match="vit"):
        P.pace_features(torch.nn.Linear(2, 2), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="noise"):
        P.color_grid(4, noise=-1.0)
    with pytest.raises(TypeError, match="n"):
        P.color_grid("4")


def test_eta_per_image_step_hand_checked():
    # η = 0: softmax(η φ̄_i) = (½, ½), so one ascent step is lr · φ̄ᵀ (p − ½) / B
    p = _pace(2, 2, eta_ascent=True, eta_per_image=True, eta_lr=1.0)
    p.eta.zero_()
    phi = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # image 0 concept 0, image 1 concept 1
    logits = torch.tensor([[50.0, 0.0], [0.0, 50.0]])  # p ≈ one-hot: image 0 class 0, image 1 class 1
    p.update_eta(logits, phi)
    assert torch.allclose(p.eta, torch.tensor([[0.25, -0.25], [-0.25, 0.25]], dtype=F64), atol=1e-12)
    assert (p.predict_proba(phi).argmax(-1) == torch.tensor([0, 1])).all()
    # the batch-averaged official step sees p̄ = φ̄ = (½, ½) here: it learns nothing about which concept is which class
    q = _pace(2, 2, eta_ascent=True, eta_lr=1.0)
    q.eta.zero_()
    q.update_eta(logits, phi)
    assert torch.allclose(q.eta[0], q.eta[1])


def test_concept_purity_and_theta_shift_hand_checked():
    concepts = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2]])
    truth = torch.tensor([[3, 3, 4, 0], [4, 0, 0, 1]])
    # concept 0: {3, 3} → 2; concept 1: {4, 0, 4} → 2; concept 2: {0, 0, 1} → 2
    assert P.concept_purity(concepts, truth) == pytest.approx(6 / 8)
    assert P.concept_purity(truth, truth) == 1.0
    a = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    b = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    assert torch.allclose(P.theta_shift(a, b), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="concepts and truth"):
        P.concept_purity(concepts, truth[:, :3])
    with pytest.raises(ValueError, match="theta_a"):
        P.theta_shift(a, b[:1])


def test_init_from_data_and_projection_training():
    vit = tiny_vit()
    x, _, _ = P.color_grid(8, img_size=16)
    p = P.PACE(32, 5, K=3, c_dim=4).init_from_data(vit, x)
    w = p.proj.weight.detach().double()
    assert torch.allclose(w @ w.T, torch.eye(4, dtype=F64), atol=1e-5)  # orthonormal principal directions
    hidden, _, _ = P.pace_features(vit, x)
    emb = p.proj(hidden).detach().double().reshape(-1, 4)
    assert emb.mean(0).abs().max() < 1e-4  # centred
    assert torch.cdist(p.mu, p.mu).fill_diagonal_(1e9).min() > 0 and torch.equal(p.mu0, p.mu)
    frozen = p.proj.weight.detach().clone()
    p.fit(vit, x, batch_size=4)
    assert torch.equal(p.proj.weight, frozen) and p.history == []
    p.fit(vit, x, batch_size=4, epochs=2, proj_lr=1e-2)
    assert not torch.equal(p.proj.weight, frozen) and len(p.history) == 4
    assert all(math.isfinite(v) for v in p.history)
    with pytest.raises(ValueError, match="proj_lr"):
        p.fit(vit, x, proj_lr=0.0)
    with pytest.raises(ValueError, match="K=3"):
        P.PACE(32, 5, K=3, c_dim=4).init_from_data(vit, x[:0])


def test_color_cells_dataset_and_patch_colors():
    from vitlab import data

    tr, te = data.load("color_cells", "train", "cpu"), data.load("color_cells", "test", "cpu")
    assert (len(tr), len(te)) == (2000, 500) and tr.images.shape[1:] == (3, 32, 32) and tr.num_classes == 2
    assert not torch.equal(tr.images[:5], te.images[:5])  # the splits are different draws
    assert torch.equal(data.load("color_cells", "test", "cpu").images, te.images)
    one = torch.zeros(1, 3, 8, 8)
    one[:, 0, :, 4:] = 1.0  # right half red, left half black
    assert data.patch_colors(one, 4).tolist() == [[0, 1, 0, 1]]
    clean, _, cells = P.color_grid(6, img_size=32, noise=0.0)
    corners = data.patch_colors(clean, 4).view(6, 8, 8)[:, ::7, ::7]  # a corner patch lies inside one cell
    assert torch.equal(corners, cells)
    with pytest.raises(ValueError, match="patch_size"):
        data.patch_colors(one, 3)
    with pytest.raises(ValueError, match="images"):
        data.patch_colors(torch.zeros(1, 1, 8, 8), 4)
    with pytest.raises(ValueError, match="split"):
        data.color_cells("dev")


def test_ladder_build_and_evaluate_on_a_tiny_vit(monkeypatch):
    from vitlab import data

    vit = tiny_vit(num_classes=2)
    x, _, _ = P.color_grid(12, img_size=16)
    monkeypatch.setattr(P, "FIT", dict(n_fit=12, n_init=12, epochs=1, batch_size=6))
    monkeypatch.setattr(P, "C_DIM", 4)
    truth = data.patch_colors(x, 4)
    for config in P.LADDER:
        pace = P.build(vit, x, config, seed=1)
        out = P.evaluate(pace, vit, x, truth)
        assert set(out) == {"purity", "used", "agree", "tv_aug", "tv_other"}
        assert 0 < out["purity"] <= 1 and 0 <= out["agree"] <= 1 and 0 <= out["tv_aug"] <= 1
    assert pace.history and pace.eta_per_image  # the lesson's configuration trains the projection
    assert 0 < P.kmeans_purity(vit, x, x, truth) <= 1
    flipped = P.flip_and_noise(x, std=0.0)
    assert torch.equal(flipped, x.flip(-1)) and torch.equal(P.flip_and_noise(x, seed=3), P.flip_and_noise(x, seed=3))
    with pytest.raises(ValueError, match="config"):
        P.build(vit, x, "best")
    with pytest.raises(ValueError, match="std"):
        P.flip_and_noise(x, std=-1.0)
