"""ViT-VQGAN: shapes, encode→decode_indices = forward's reconstruction, the straight-through gradient reaches the
encoder, factorized + l2 looks codes up by cosine in code_dim (a hand case where Euclid disagrees), a few steps
lower the reconstruction loss; CodeGPT (a TinyLM): causal, greedy at temperature 0 (= argmax of its own forward),
seeded sampling is reproducible; bad input names the argument."""
import math

import pytest
import torch

from vitlab.methods.selfsup.vit_vqgan import CodeGPT, ViTVQGAN
from vitlab.vlm.lm import TinyLM

SMALL = dict(img_size=16, patch_size=4, in_chans=1, dim=32, depth=1, heads=2, code_dim=4, num_codes=16)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return ViTVQGAN(**{**SMALL, **kw}).eval()


def images(n=2, seed=0, size=16, chans=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, chans, size, size, generator=g)


def test_shapes_and_baseline():
    m = model()
    recon, vq_loss, idx = m(images())
    assert recon.shape == (2, 1, 16, 16) and vq_loss.ndim == 0 and idx.shape == (2, 16) and idx.dtype == torch.long
    assert m.quantizer.codebook.weight.shape == (16, 4)  # factorized: the codebook lives in code_dim
    base = model(factorized=False, l2_normalized=False)  # the vanilla-VQ baseline: lookup in dim, Euclidean
    assert base.quantizer.codebook.weight.shape == (16, 32) and not base.quantizer.l2_normalized
    recon, _, idx = base(images())
    assert recon.shape == (2, 1, 16, 16) and idx.shape == (2, 16)
    rgb = model(in_chans=3)
    assert rgb(images(chans=3))[0].shape == (2, 3, 16, 16)


def test_encode_then_decode_equals_forward():
    m, x = model(), images()
    recon, _, idx = m(x)
    assert torch.equal(m.encode(x), idx)
    torch.testing.assert_close(m.decode_indices(idx), recon, rtol=0, atol=1e-6)


def test_straight_through_gradient_reaches_encoder():
    m, x = model(), images()
    recon, _, _ = m(x)
    ((recon - x) ** 2).mean().backward()  # reconstruction only: no vq_loss, so any encoder gradient came through STE
    for p in (m.patch_embed.proj.weight, m.blocks[0].attn.qkv.weight, m.enc_head[0].weight,
              m.quantizer.proj_in.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert m.quantizer.codebook.weight.grad is None or m.quantizer.codebook.weight.grad.abs().sum() == 0


def test_factorized_l2_lookup_is_cosine_in_code_dim():
    x = images()
    m = model()
    u = m.quantizer.proj_in(m.encode_features(x))  # [B, N, code_dim]
    assert u.shape == (2, 16, 4)
    cos = torch.nn.functional.normalize(u, dim=-1) @ torch.nn.functional.normalize(m.quantizer.codebook.weight,
                                                                                    dim=-1).t()
    assert torch.equal(m.encode(x), cos.argmax(dim=-1))

    # hand case in a 2-d lookup space: every token's u = (1, 0.9) (proj_in weight 0, bias (1, 0.9));
    # codes (10, 0) and (0, 0.1): cosine picks code 0 (0.743 vs 0.669), Euclid code 1 (1.64 vs 81.8)
    def hand(l2):
        h = model(code_dim=2, num_codes=2, l2_normalized=l2)
        with torch.no_grad():
            h.quantizer.proj_in.weight.zero_()
            h.quantizer.proj_in.bias.copy_(torch.tensor([1.0, 0.9]))
            h.quantizer.codebook.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 0.1]]))
        return h

    assert hand(True).encode(x).unique().tolist() == [0]
    assert hand(False).encode(x).unique().tolist() == [1]
    h = hand(True)  # the decoder sees proj_out(unit code 0) = proj_out((1, 0)) on every token
    _, vq_loss, _ = h(x)
    cos0 = 1 / math.sqrt(1 + 0.81)
    torch.testing.assert_close(vq_loss, torch.tensor(1.25 * (2 - 2 * cos0) / 2))
    torch.testing.assert_close(h.decode_indices(torch.zeros(2, 16, dtype=torch.long)), h(x)[0])


def test_a_few_steps_lower_the_reconstruction_loss():
    m = model().train()
    g = torch.Generator().manual_seed(1)  # smooth blobs: a learnable tiny batch
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    c = torch.rand(8, 2, generator=g) * 12 + 2
    x = torch.exp(-((xx - c[:, :1, None]) ** 2 + (yy - c[:, 1:, None]) ** 2) / 8)[:, None]
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    first = None
    for _ in range(25):
        total, parts = m.loss(x)
        first = parts["l2"] if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert set(parts) == {"l2", "l1", "vq", "total", "perplexity", "used"}
    assert parts["l2"] < 0.5 * first, (first, parts["l2"])
    # the l1 term enters the total with its weight
    total, parts = m.loss(x, l2_weight=0.0, l1_weight=2.0)
    assert math.isclose(parts["total"], 2 * parts["l1"] + parts["vq"], rel_tol=1e-5)


def gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return CodeGPT(**{**dict(num_codes=16, seq_len=10, dim=32, depth=2, heads=2), **kw}).eval()


def test_code_gpt_reuses_tinylm_and_is_causal():
    m = gpt()
    assert isinstance(m.lm, TinyLM) and m.lm.vocab_size == 17  # 16 codes + the start token
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (3, 10), generator=g)
    logits = m(idx)
    assert logits.shape == (3, 10, 16)
    t = 6
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 5) % 16
    logits2 = m(changed)
    torch.testing.assert_close(logits2[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-6)  # logits[t] sees idx[:t]
    assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])
    torch.testing.assert_close(m(idx[:, :4]), logits[:, :4], rtol=0, atol=1e-5)  # shorter prefixes work
    loss = m.loss(idx)
    assert loss.ndim == 0 and abs(loss.item() - math.log(16)) < 1.0  # near uniform at init


def test_code_gpt_sampling():
    m = gpt()
    greedy = m.sample(4, temperature=0.0)
    assert greedy.shape == (4, 10) and greedy.dtype == torch.long
    assert torch.equal(m(greedy).argmax(dim=-1), greedy)  # greedy (KV cache) = argmax of the full forward
    assert torch.equal(m.sample(2, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3)),
                       greedy[:2])  # top-1 sampling is greedy
    a = m.sample(4, generator=torch.Generator().manual_seed(7))
    b = m.sample(4, generator=torch.Generator().manual_seed(7))
    c = m.sample(4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 16  # the start token is never sampled
    k = m.sample(8, top_k=3, generator=torch.Generator().manual_seed(1))
    top3 = m(k).topk(3, dim=-1).indices
    assert (top3 == k[..., None]).any(-1).all()  # each sampled code is among its step's 3 most likely


def test_bad_input():
    with pytest.raises(ValueError, match="patch_size"):
        ViTVQGAN(**{**SMALL, "patch_size": 5})
    with pytest.raises(ValueError, match="heads"):
        ViTVQGAN(**{**SMALL, "heads": 3})
    with pytest.raises(TypeError, match="num_codes"):
        ViTVQGAN(**{**SMALL, "num_codes": 2.5})
    m = model()
    with pytest.raises(ValueError, match="in_chans=1"):
        m(images(chans=3))
    with pytest.raises(ValueError, match="img_size=16"):
        m.encode(images(size=8))
    with pytest.raises(ValueError, match="x must be an image batch"):
        m.loss(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="idx must lie in 0..15"):
        m.decode_indices(torch.full((1, 16), 16))
    with pytest.raises(ValueError, match=r"idx must be \[B, 16\]"):
        m.decode_indices(torch.zeros(1, 15, dtype=torch.long))
    with pytest.raises(TypeError, match="idx must be an integer tensor"):
        m.decode_indices(torch.zeros(1, 16))
    with pytest.raises(ValueError, match="l1_weight"):
        m.loss(images(), l1_weight=-1)
    c = gpt()
    with pytest.raises(ValueError, match="idx must lie in 0..15"):
        c(torch.full((1, 3), -1))
    with pytest.raises(ValueError, match="idx must be"):
        c.loss(torch.zeros(1, 11, dtype=torch.long))  # longer than seq_len
    with pytest.raises(ValueError, match="temperature"):
        c.sample(1, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        c.sample(1, top_k=17)
    with pytest.raises(TypeError, match="seq_len"):
        CodeGPT(16, "10")


# ----------------------------------------------------------------------------------------- the lesson's recipe
def test_the_two_tokenizers_differ_only_in_the_lookup():
    from vitlab import zoo
    from vitlab.methods.selfsup import vit_vqgan as V
    from vitlab.models.registry import MODELS

    a, b = dict(MODELS["vqgan_vitvq_digits"]), dict(MODELS["vqgan_vq_digits"])
    assert (a.pop("factorized"), a.pop("l2_normalized"), b.pop("factorized"), b.pop("l2_normalized")) == \
        (True, True, False, False)
    assert a == b == V.TOKENIZER
    for seed in V.SEEDS:
        ca, cb = (zoo.ZOO[f"vqgan_{v}_digits_s{seed}"].config("cpu") for v in ("vitvq", "vq"))
        assert ca.pop("model") != cb.pop("model") and ca == cb  # same data, steps, lr, batch, seed
    prior = zoo.ZOO["code_prior_digits_s0"]
    assert prior.objective_kwargs == {"tokenizer": "vqgan_vitvq_digits_s0"} and prior.uses == ("vqgan_vitvq_digits_s0",)


def test_tokenizer_metrics_match_the_forward():
    from vitlab.methods.selfsup.vit_vqgan import tokenizer_metrics

    m, x = model(), images(6)
    out = tokenizer_metrics(m, x, batch_size=4)  # two batches
    with torch.no_grad():
        recon, _, idx = m(x)
    assert out["mse"] == pytest.approx(torch.nn.functional.mse_loss(recon, x).item(), rel=1e-5)
    assert out["used"] == pytest.approx(idx.unique().numel() / SMALL["num_codes"])
    assert 1 <= out["perplexity"] <= idx.unique().numel() + 1e-6
