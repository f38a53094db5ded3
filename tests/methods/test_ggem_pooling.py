"""GGeM pooling (no official code: property tests and hand-checked cases, CURRICULUM.md #4)."""
import pytest
import torch

from vitlab import zoo
from vitlab.methods.architectures import ggem_pooling as G


def gem_reference(x, p, eps=1e-6):
    """cirtorch-style GeM over tokens: avg(clamp(x, eps)^p)^(1/p)."""
    return x.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def test_one_group_is_gem():
    x = torch.randn(3, 7, 8)
    pool = G.GGeM(8, groups=1, p_init=3.0)
    torch.testing.assert_close(pool(x), gem_reference(x, 3.0))


def test_p_one_is_the_mean_and_large_p_the_max_on_positive_tokens():
    # seeded, and in [0.7, 1.3]: x^200 neither underflows (0.45^200 is below float32's range) nor overflows
    x = 0.7 + 0.6 * torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(G.GGeM(4, 2, p_init=1.0)(x), x.mean(dim=1))
    torch.testing.assert_close(G.GGeM(4, 2, p_init=200.0)(x), x.amax(dim=1), rtol=0.02, atol=0)


def test_each_group_pools_with_its_own_exponent():
    """D = 4 in 2 groups with p = (1, 2): channels 0-1 take the mean, channels 2-3 the root mean square."""
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0],
                       [3.0, 4.0, 1.0, 0.0]]])  # [B=1, N=2, D=4]
    pool = G.GGeM(4, groups=2)
    with torch.no_grad():
        pool.p.copy_(torch.tensor([1.0, 2.0]))
    eps = 1e-6
    want = torch.tensor([[2.0, 3.0, (10 / 2) ** 0.5, ((16 + eps ** 2) / 2) ** 0.5]])  # 0 is clamped to eps
    torch.testing.assert_close(pool(x), want)


def test_negative_activations_are_clamped_as_gem_does():
    x = torch.tensor([[[-5.0], [4.0]]])
    pool = G.GGeM(1, 1, p_init=1.0)
    torch.testing.assert_close(pool(x), torch.tensor([[(1e-6 + 4.0) / 2]]))


def test_gradients_reach_tokens_and_exponents():
    x = (torch.rand(2, 4, 6, dtype=torch.float64) + 0.2).requires_grad_()
    pool = G.GGeM(6, groups=3).double()
    assert torch.autograd.gradcheck(lambda x, p: x.pow(p.repeat_interleave(2)).mean(1).pow(1 / p.repeat_interleave(2)),
                                    (x, pool.p.detach().clone().requires_grad_()))
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.shape == (3,) and x.grad.abs().sum() > 0


def test_ggem_vit_pools_its_final_patch_tokens_not_the_cls_token():
    from vitlab.methods.architectures import recipes
    from vitlab.models import create_model

    torch.manual_seed(0)
    model = create_model(recipes.model_name("ggem_vit")).eval()
    x = torch.rand(2, 1, 28, 28)
    tokens = model.forward_features(x)  # [B, CLS + 49, 64], after the final norm
    assert tokens.shape == (2, 50, 64) and model.ggem.groups == 4  # one exponent per head
    torch.testing.assert_close(model(x), model.head(gem_reference(tokens[:, 1:], 3.0)))
    with torch.no_grad():
        model.ggem.p.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 1:].clamp(min=1e-6).mean(1))
    # the rest is the plain ViT's: same parameters but the 4 exponents, same recipe entry but the model
    plain = create_model(recipes.model_name("vit"))
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters()) == 4
    cfg, plain_cfg = (zoo.ZOO[recipes.entry_name(m, 1)].config("cpu") for m in ("ggem_vit", "vit"))
    assert cfg.pop("model") == "ch1_ggem_vit" and plain_cfg.pop("model") == "ch1_vit" and cfg == plain_cfg


def test_probe_poolings_read_the_right_tokens():
    tokens = torch.rand(2, 5, 4)  # CLS + 4 patches
    cls = G.PoolingProbe("cls", 4, 3)
    gap = G.PoolingProbe("gap", 4, 3)
    torch.testing.assert_close(cls.embed(tokens), tokens[:, 0])
    torch.testing.assert_close(gap.embed(tokens), tokens[:, 1:].mean(1))
    assert G.PoolingProbe("ggem", 4, 3, groups=2).gem.p.shape == (2,)
    assert G.PoolingProbe("gem", 4, 3, groups=2).gem.p.shape == (1,)


def test_map_at_r_by_hand():
    """Unit vectors at these angles (degrees), classes 0 0 0 | 1 1 1, so R = 2 for every query:
        0, 10, 50 | 32, 105, 115
    query 0:   10 (hit), 32 (miss)  -> AP@R = (1/1) / 2 = 0.5      query 32:  50, 10 (misses) -> 0
    query 10:  0 (hit), 32 (miss)   -> 0.5                         query 105: 115 (hit), 50   -> 0.5
    query 50:  32 (miss), 10 (hit)  -> (1/2) / 2 = 0.25            query 115: 105 (hit), 50   -> 0.5
    mAP@R = 2.25 / 6."""
    angles = torch.tensor([0.0, 10.0, 50.0, 32.0, 105.0, 115.0]).deg2rad()
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    assert G.map_at_r(emb, labels) == pytest.approx(2.25 / 6)


def test_probe_training_is_reproducible():
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randn(64, 5, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    a = G.train_probe(tokens, labels, "ggem", num_classes=3, groups=2, seed=1, steps=5, batch_size=16)
    b = G.train_probe(tokens, labels, "ggem", num_classes=3, groups=2, seed=1, steps=5, batch_size=16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (a.gem.p >= 1.0).all()


@pytest.mark.parametrize("call, match", [
    (lambda: G.GGeM(6, groups=4), "GGeM: groups=4 must divide dim=6"),
    (lambda: G.GGeM(0), "GGeM: dim must be"),
    (lambda: G.GGeM(4, p_init=0.0), "GGeM: p_init must be"),
    (lambda: G.GGeM(4)(torch.rand(2, 3, 5)), "GGeM: x has 5 channels; expected dim=4"),
    (lambda: G.GGeM(4)(torch.rand(2, 4)), "GGeM: x must be"),
    (lambda: G.PoolingProbe("max", 4, 3), "PoolingProbe: pooling must be one of"),
    (lambda: G.train_probe(torch.rand(4, 3, 2), torch.zeros(3, dtype=torch.long), "gap", num_classes=2),
     "train_probe: labels has 3 entries; expected one per image"),
    (lambda: G.map_at_r(torch.rand(4, 2), torch.zeros(3)), "map_at_r: labels has 3 entries"),
    (lambda: G.token_features(torch.nn.Linear(2, 2), torch.rand(1, 1, 4, 4)), "token_features: vit must have"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
