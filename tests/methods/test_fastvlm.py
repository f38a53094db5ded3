"""FastVLM's FastViTHD (official apple/ml-fastvlm mci.py ``fastvithd``; the same network is timm's ``fastvit_mci3``,
installed): the tiny encoder against timm's FastVit written out from the official layout on the same weights, the
official sizes key for key against ``fastvit_mci3``, train-time vs reparameterised outputs, token counts, the
parameter-matched ViT/8, the VLM and its TTFT, the zoo objective, and bad input."""
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.fastvit import FastVit, RepConditionalPosEnc

from vitlab import zoo
from vitlab.methods.vision_language import fastvlm as F
from vitlab.models import VisionTransformer
from vitlab.vlm import TinyVLM, WordTokenizer, caption_scenes


def _perturb_(module, seed=0):
    """Move every parameter and BatchNorm statistic off its init (layer scales from 1e-5 to ~0.1-1, BN means off 0,
    variances off 1), so that every branch really contributes and a copy or a reparameterisation is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


def _official_layout(layers, embed_dims, **kw):
    """timm's FastVit with the arguments of the official ``fastvithd`` (mci.py), written out here, not taken from
    ``fastvithd_config``."""
    cpe = partial(RepConditionalPosEnc, spatial_shape=(7, 7))
    return FastVit(in_chans=3, layers=layers, embed_dims=embed_dims, mlp_ratios=(4, 4, 4, 4, 4),
                   downsamples=(False, True, True, True, True), se_downsamples=(False,) * 5,
                   pos_embs=(None, None, None, cpe, cpe),
                   token_mixers=("repmixer", "repmixer", "repmixer", "attention", "attention"), lkc_use_act=True,
                   norm_layer=partial(LayerNorm2d, eps=1e-5), stem_use_scale_branch=False, num_classes=0, **kw)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _perturb_(F.fastvithd_tiny()).eval()


def test_tiny_equals_timm_fastvit_on_the_same_weights(tiny):
    ref = _official_layout(F.TINY["layers"], F.TINY["embed_dims"]).eval()
    ref.load_state_dict(tiny.state_dict(), strict=True)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, want = tiny.forward_features(x), ref.forward_features(x)
        assert out.shape == (2, 256, 2, 2)
        assert torch.equal(out, want)
        assert torch.equal(tiny(x), ref(x))  # pooled features (the timm head with num_classes=0)
    tiny.train(), ref.train()  # BatchNorm on batch statistics: still the same computation
    try:
        with torch.no_grad():
            assert torch.equal(tiny.forward_features(x), ref.forward_features(x))
    finally:
        tiny.eval(), ref.eval()
        tiny.load_state_dict(ref.state_dict())  # train mode moved the running stats of both alike


def test_official_sizes_are_timm_fastvit_mci3_key_for_key():
    with torch.device("meta"):
        ours = F.fastvithd()
        ref = timm.create_model("fastvit_mci3", num_classes=0)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    assert a["final_conv.conv_kxk.0.conv.weight"] == (3072, 1, 3, 3)  # conv_exp: 3x3, groups 1536, 2 x 1536 out
    assert ours.num_tokens(1024) == 256 and ours.embed_dim == 3072  # mobileclip_l.json: 1024 px -> 16 x 16


def test_reparameterised_equals_train_time_model(tiny):
    x = torch.rand(3, 3, 128, 192, generator=torch.Generator().manual_seed(2))
    fast = F.reparameterized(tiny)
    with torch.no_grad():
        want, got = tiny.forward_features(x), fast.forward_features(x)
    assert got.shape == (3, 256, 2, 3)
    torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.stem.modules())  # branches and their BNs folded
    mixer = fast.stages[0].blocks[0].token_mixer
    assert mixer.reparam_conv is not None and not hasattr(mixer, "mixer")
    assert fast.stages[3].pos_emb.reparam_conv is not None
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in tiny.parameters())
    assert tiny.stages[0].blocks[0].token_mixer.reparam_conv is None  # the original is untouched
    vlm = F.fastvlm_model("fastvithd")
    assert isinstance(F.reparameterized(vlm).vision_encoder.stages[0].blocks[0].token_mixer.reparam_conv, nn.Conv2d)


def test_reparameterize_by_hand_repmixer():
    """RepMixer in eval: x + g * (BN1(dw(x)) - BN2(x)) is one depthwise conv; the folded kernel at one pixel."""
    torch.manual_seed(0)
    enc = _perturb_(F.fastvithd_tiny()).eval()
    mixer = enc.stages[0].blocks[0].token_mixer
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        conv, bn = mixer.mixer.conv_kxk[0].conv, mixer.mixer.conv_kxk[0].bn
        a = nn.functional.batch_norm(nn.functional.conv2d(x, conv.weight, None, 1, 1, groups=8), bn.running_mean,
                                     bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        a = a + nn.functional.batch_norm(x, mixer.mixer.identity.running_mean, mixer.mixer.identity.running_var,
                                         mixer.mixer.identity.weight, mixer.mixer.identity.bias,
                                         eps=mixer.mixer.identity.eps)
        sc, sbn = mixer.mixer.conv_scale.conv, mixer.mixer.conv_scale.bn
        a = a + nn.functional.batch_norm(nn.functional.conv2d(x, sc.weight, None, 1, 0, groups=8), sbn.running_mean,
                                         sbn.running_var, sbn.weight, sbn.bias, eps=sbn.eps)
        n = mixer.norm.identity
        b = nn.functional.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, eps=n.eps)
        want = x + mixer.layer_scale.gamma * (a - b)
        torch.testing.assert_close(mixer(x), want, atol=1e-5, rtol=1e-5)
        mixer.reparameterize()
        torch.testing.assert_close(mixer(x), want, atol=1e-5, rtol=1e-5)
        assert tuple(mixer.reparam_conv.weight.shape) == (8, 1, 3, 3)


def test_tokens_by_resolution():
    assert [F.token_count("fastvithd", r) for r in (64, 128, 256, 1024)] == [1, 4, 16, 256]
    assert [F.token_count("vit", r) for r in (64, 128, 256)] == [64, 256, 1024]
    assert F.token_count("vit", 128, patch_size=16) == 64
    vlm = F.fastvlm_model("fastvithd").eval()
    feats = vlm.encode_images(torch.rand(2, 3, 128, 128))
    assert feats.shape == (2, 4, 256)
    vit = F.fastvlm_model("vit").eval()
    assert vit.encode_images(torch.rand(2, 3, 128, 128)).shape == (2, 256, 64)  # CLS dropped


def test_matched_vit_and_the_same_lm():
    enc = F.fastvithd_tiny()
    vit, n = F.matched_vit(enc)
    assert isinstance(vit, VisionTransformer) and vit.patch_embed.patch_size in (8, (8, 8))
    assert abs(n["vit"] - n["fastvithd"]) / n["fastvithd"] < 0.1
    for depth in (len(vit.blocks) - 1, len(vit.blocks) + 1):  # the chosen depth is the closest
        other = VisionTransformer(img_size=128, in_chans=3, num_classes=0, depth=depth, **F.VIT)
        assert abs(sum(p.numel() for p in other.parameters()) - n["fastvithd"]) >= abs(n["vit"] - n["fastvithd"])
    a, b = F.fastvlm_model("fastvithd"), F.fastvlm_model("vit")
    assert {k: v.shape for k, v in a.lm.state_dict().items()} == {k: v.shape for k, v in b.lm.state_dict().items()}
    assert a.lm.max_len == 256 + F.TEXT_LEN


def test_vlm_trains_and_times():
    tok = WordTokenizer()
    torch.manual_seed(0)
    vlm = F.fastvlm_model("fastvithd")
    images = torch.rand(4, 3, 128, 128)
    prompts = torch.tensor([tok.encode("what colour is the circle")] * 4)
    answers = torch.tensor([tok.encode("red", eos=True)] * 4)
    loss = vlm.loss(images, prompts, answers)
    loss.backward()
    assert torch.isfinite(loss) and vlm.vision_encoder.stem[0].conv_kxk[0].conv.weight.grad is not None
    fast = F.reparameterized(vlm)
    assert F.vision_ms(fast, images[:1], warmup=0, repeats=1) > 0
    assert F.prefill_ms(fast, images[:1], prompts[:1], warmup=0, repeats=1) > 0
    assert fast.ttft(images[:1], prompts[:1], warmup=0, repeats=1) > 0
    with torch.no_grad():  # the deployed VLM answers as the trained one does
        torch.testing.assert_close(fast.prefill(images, prompts)[0], vlm.eval().prefill(images, prompts)[0],
                                   atol=1e-4, rtol=1e-4)


def test_ttft_sweep_rows():
    rows = F.ttft_sweep([64, 128], warmup=0, repeats=1, progress=False)
    assert [(r["encoder"], r["img_size"], r["tokens"]) for r in rows] == [
        ("fastvithd", 64, 1), ("vit", 64, 64), ("fastvithd", 128, 4), ("vit", 128, 256)]
    assert all(r["ttft_ms"] > 0 and r["vision_ms"] > 0 and r["prefill_ms"] > 0 and r["params"] > 0 for r in rows)


def test_objective_steps_and_zoo_entries():
    obj = zoo.OBJECTIVES["fastvlm_vqa"](data_seed=0, seed=0, kinds=["colour", "count"], eval_every=1, val_n=8)
    torch.manual_seed(0)
    vlm = F.fastvlm_model("fastvithd", img_size=64)
    data = caption_scenes("train", img_size=64)
    idx = torch.tensor([0, 5, 9])
    loss, logits = obj.step_fn(vlm, data.images[idx], idx)
    assert logits is None and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    for enc in F.ENCODERS:
        for seed in F.SEEDS:
            r = zoo.ZOO[F.entry_name(enc, seed)]
            assert r.fit == F.FIT and r.seed == seed and r.shares == {"smoke": "cpu"}
            assert r.per_profile["cpu"]["steps"] == F.STEPS["cpu"] and r.objective == "fastvlm_vqa"
        assert zoo.ZOO[F.entry_name(enc, 0, long=True)].per_profile["cpu"]["steps"] == 2 * F.STEPS["cpu"]
    a, b = zoo.ZOO[F.entry_name("fastvithd", 1)], zoo.ZOO[F.entry_name("vit", 1)]
    assert (a.fit, a.data_kwargs, a.objective_kwargs, a.per_profile) == (b.fit, b.data_kwargs, b.objective_kwargs,
                                                                          b.per_profile)


def test_bad_input():
    with pytest.raises(ValueError, match="layers and embed_dims"):
        F.fastvithd_config(layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="multiple of embed_dims"):
        F.fastvithd_config(layers=(1,) * 5, embed_dims=(8, 12, 32, 64, 128))
    with pytest.raises(ValueError, match="multiple of 32"):
        F.fastvithd_config(layers=(1,) * 5, embed_dims=(4, 8, 16, 16, 32))
    with pytest.raises(ValueError, match="pos_kernel"):
        F.fastvithd_config(pos_kernel=4)
    with pytest.raises(TypeError, match="layers"):
        F.fastvithd_config(layers=(1, 1, 1.5, 1, 1))
    with pytest.raises(ValueError, match="img_size"):
        F.fastvithd_tiny(img_size=100)
    enc = F.fastvithd_tiny()
    with pytest.raises(ValueError, match="multiples of the total stride"):
        enc.forward_features(torch.rand(1, 3, 96, 128))
    with pytest.raises(ValueError, match="image batch"):
        enc.forward_features(torch.rand(3, 128, 128))
    with pytest.raises(ValueError, match="image batch"):
        enc.forward_features(torch.rand(1, 1, 128, 128))
    with pytest.raises(ValueError, match="encoder"):
        F.token_count("cnn", 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        F.token_count("fastvithd", 96)
    with pytest.raises(TypeError, match="FastViTHD"):
        F.matched_vit(VisionTransformer())
    with pytest.raises(ValueError, match="encoder"):
        F.fastvlm_model("resnet")
    with pytest.raises(ValueError, match="img_size"):
        F.fastvlm_model("vit", img_size=96)
    with pytest.raises(ValueError, match="projector"):
        F.fastvlm_model("vit", projector="qformer")
    with pytest.raises(TypeError, match="model"):
        F.reparameterized("model")
    with pytest.raises(TypeError, match="TinyVLM"):
        F.vision_ms(enc, torch.rand(1, 3, 128, 128))
    with pytest.raises(TypeError, match="TinyVLM"):
        F.prefill_ms(enc, torch.rand(1, 3, 128, 128), torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="resolutions"):
        F.ttft_sweep([100], progress=False)
    with pytest.raises(TypeError, match="resolutions"):
        F.ttft_sweep(128, progress=False)
    with pytest.raises(ValueError, match="kinds"):
        F.vqa_objective(kinds=["colour", "weather"])
    with pytest.raises(TypeError, match="kinds"):
        F.vqa_objective(kinds="colour")
    with pytest.raises(TypeError, match="TinyVLM"):
        F.measure(enc)
    with pytest.raises(ValueError, match="seed"):
        F.entry_name("vit", 3)
    with pytest.raises(ValueError, match="seed"):
        F.entry_name("vit", 1, long=True)
    with pytest.raises(ValueError, match="encoder"):
        F.model_name("clip")
    assert isinstance(F.fastvlm_model("vit"), TinyVLM)
