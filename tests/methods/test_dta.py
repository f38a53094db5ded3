"""DTA: the layer features are the blocks' outputs, the feature attack stays in the ε-ball and pushes its layer's
tokens away (further than noise), agrees with a short reference PGD written here, the layer search takes the most
vulnerable layer, the zoo's fine-tunes train what their scheme says, the measurement runs, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from tests.model_helpers import tiny_vit
from vitlab import zoo
from vitlab.data import ImageDataset
from vitlab.methods.robustness import dta as D


def _images(n=6, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_block_tokens_are_the_blocks_outputs():
    vit, x = tiny_vit(), _images()
    last = D.block_tokens(vit, x, len(vit.blocks) - 1)
    assert torch.allclose(vit.norm(last), vit.forward_features(x), atol=1e-6)
    assert torch.allclose(D.block_tokens(vit, x, 0), vit.blocks[0](vit.embed(x)), atol=1e-6)


def test_feature_attack_stays_in_the_ball_and_moves_its_layer_more_than_noise():
    vit, x = tiny_vit(), _images()
    adv = D.feature_attack(vit, x, 1, eps=0.05, steps=5)
    assert (adv - x).abs().max() <= 0.05 + 1e-6 and 0 <= adv.min() and adv.max() <= 1
    noise = D.noise_attack(x, eps=0.05)
    assert D.layer_similarity(vit, x, adv, 1) < D.layer_similarity(vit, x, noise, 1) < 1


def test_feature_attack_agrees_with_a_reference_pgd():
    vit, x = tiny_vit(), _images(4)
    eps, steps, layer = 0.05, 3, 0
    # the reference: the same random start (pgd's generator), signed steps of 2.5 eps / steps, projections
    g = torch.Generator().manual_seed(0)
    delta = (2 * torch.rand(x.shape, generator=g) - 1) * eps
    with torch.no_grad():
        clean = D.block_tokens(vit, x, layer)
    for _ in range(steps):
        delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
        loss = -F.cosine_similarity(D.block_tokens(vit, x + delta, layer), clean, dim=-1).mean(1).sum()
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    reference = (x + delta).clamp(0, 1)
    assert torch.allclose(D.feature_attack(vit, x, layer, eps=eps, steps=steps), reference, atol=1e-6)


def test_noise_is_plus_or_minus_eps():
    x = torch.full((2, 1, 4, 4), 0.5)
    d = D.noise_attack(x, eps=0.1) - x
    assert torch.allclose(d.abs(), torch.full_like(d, 0.1))
    assert (d > 0).any() and (d < 0).any()


def test_layer_search_takes_the_layer_the_attack_moves_most():
    vit, x = tiny_vit(), _images()
    best, sims = D.layer_search(vit, x, eps=0.05, steps=3)
    assert len(sims) == len(vit.blocks) and sims[best] == min(sims)


def test_zoo_finetunes_train_what_their_scheme_says():
    for seed in D.SEEDS:
        for scheme, trainable in D.SCHEMES.items():
            r = zoo.ZOO[D.finetuned_name(scheme, seed)]
            assert r.init == D.pretrained_name(seed) and r.seed == seed and r.model == zoo.ZOO[r.init].model
            assert r.fit.get("trainable") == (None if trainable is None else list(trainable))
            assert (r.data, r.data_kwargs) == (D.DOWNSTREAM[0], D.DOWNSTREAM[1])


def test_measure_on_a_small_downstream_set(monkeypatch):
    full = D.downstream

    def small(split, profile=None):
        ds = full(split, profile)
        return ImageDataset(ds.images[:12], ds.labels[:12], name=ds.name, split=split, classes=ds.classes)

    monkeypatch.setattr(D, "downstream", small)
    model = zoo.get(D.pretrained_name(0), "smoke", progress=False)  # chapter 1's committed ViT stands in
    out = D.measure(model, "smoke", seed=0, n_search=6)
    assert {"best_layer", "clean", "asr_noise", "asr_whitebox", "asr_l0", "sim_l3"} <= set(out)
    assert out["sim_l0"] < 1 and 0 <= out["asr_whitebox"] <= 1


def test_bad_input_names_the_argument():
    vit, x = tiny_vit(), _images()
    with pytest.raises(ValueError, match="layer"):
        D.block_tokens(vit, x, 2)
    with pytest.raises(TypeError, match="VisionTransformer"):
        D.feature_attack(torch.nn.Linear(2, 2), x, 0)
    with pytest.raises(ValueError, match="eps"):
        D.noise_attack(x, eps=0)
    with pytest.raises(ValueError, match="scheme"):
        D.finetuned_name("lora", 0)
