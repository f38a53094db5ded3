"""vitlab.quant: quantisers and calibration by hand and against torch's fake_quantize / observers; the quantised
course ViT (exact when disabled, close at W8A8, worse at W4A4); sizes and BOPs by hand; bad input."""
import math

import pytest
import torch
import torch.nn as nn

import vitlab.kernels.fake_quant as fq_mod
from vitlab.kernels.fake_quant import fake_quant_ref
from vitlab.models.vit import Attention, VisionTransformer
from vitlab.quant import (ETAS, FakeQuantizer, QuantAttention, QuantLinear, average_weight_bits, bops,
                          calibrate_model, float_state_dict, log2_params, minmax_params, model_size_bits,
                          mse_params, percentile_params, quant_layers, quant_report, quantize_model, quantizers,
                          range_params, set_quant_state, shift_log2_params)


@pytest.fixture
def reference(monkeypatch):
    """Model-level tests: the PyTorch reference instead of Triton's CPU interpreter (~15x slower; the
    kernel's own tests compare the two)."""
    monkeypatch.setattr(fq_mod, "use_triton", lambda *t: False)


@pytest.fixture(scope="module")
def course():
    from vitlab import data as vdata, zoo
    model = zoo.get("vit_tiny_mnist5k", "smoke", progress=False)
    train = vdata.load("mnist5k", "train", "smoke")
    test = vdata.load("mnist5k", "test", "smoke")
    g = torch.Generator().manual_seed(0)
    calib = train.images[torch.randperm(len(train.images), generator=g)[:32]]
    return model, calib, (test.images[:256], test.labels[:256])


def _acc(model, data):
    with torch.no_grad():
        return (model(data[0]).argmax(-1) == data[1]).float().mean().item()


# ------------------------------------------------------------------------------------ calibration by hand
def test_uniform_params_by_hand():
    s, z = minmax_params(torch.tensor([-1.0, 0.5, 2.0]), 2)  # [-1, 2] on 3 steps
    assert s.item() == 1.0 and z.item() == 1 and s.shape == () and z.dtype == torch.int32
    s, z = minmax_params(torch.tensor([0.5, 3.0]), 2)  # range widened to include 0: [0, 3]
    assert s.item() == 1.0 and z.item() == 0
    s, z = minmax_params(torch.tensor([[-2.0, 1.0], [0.0, 6.0]]), 3, axis=0)  # rows: [-2, 1], [0, 6] on 7 steps
    torch.testing.assert_close(s, torch.tensor([3 / 7, 6 / 7]))
    assert z.tolist() == [5, 0]  # rint(2 / (3/7)) = rint(4.67) = 5
    s, z = minmax_params(torch.tensor([-0.5, 1.27]), 8, symmetric=True)  # amax / 127, signed grid
    assert math.isclose(s.item(), 0.01, rel_tol=1e-6) and z.item() == 128
    s, z = percentile_params(torch.arange(101.0), 8, q=0.99)  # quantiles 1 and 99 -> [0, 99]
    assert math.isclose(s.item(), 99 / 255, rel_tol=1e-6) and z.item() == 0
    s, _ = log2_params(torch.tensor([0.5, 0.25, 0.1]), 3)
    assert s.item() == 0.5


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_equals_torch_observers_and_fake_quantize(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 50, generator=g) * torch.linspace(0.1, 3, 6)[:, None] + 0.3
    qmax = 2 ** bits - 1
    obs = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=qmax)
    obs(x)
    ts, tz = obs.calculate_qparams()
    s, z = minmax_params(x, bits)
    assert s.item() == ts.item() and z.item() == tz.item()  # bit-exact parameters
    q = FakeQuantizer(bits).calibrate(x=x)
    assert torch.equal(q(x), torch.fake_quantize_per_tensor_affine(x, ts.item(), int(tz), 0, qmax))

    obs = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.quint8, quant_min=0, quant_max=qmax)
    obs(x)
    ts, tz = obs.calculate_qparams()
    s, z = minmax_params(x, bits, axis=0)
    assert torch.equal(s, ts.float()) and torch.equal(z.long(), tz.long())
    q = FakeQuantizer(bits, axis=0).calibrate(x=x)
    assert torch.equal(q(x), torch.fake_quantize_per_channel_affine(x, ts.float(), tz.int(), 0, 0, qmax))


def test_representable_values_round_trip():
    s, z = torch.tensor([0.25, 0.1]), torch.tensor([3, 7], dtype=torch.int32)
    grid = (torch.arange(16.0)[None] - z[:, None]) * s[:, None]  # every level of a 4-bit per-channel grid
    assert torch.equal(fake_quant_ref(grid, s, z, 4, axis=0), grid)
    lv = 0.5 * 2.0 ** -torch.arange(8.0)  # log2, 3 bits: s * 2^-k
    assert torch.equal(fake_quant_ref(lv, 0.5, None, 3, mode="log2"), lv)
    sl = 2.0 ** (-0.5 * torch.arange(8.0)) - 0.01  # shift_log2: 2^(-s q) - eta
    assert torch.equal(fake_quant_ref(sl, 0.5, None, 3, mode="shift_log2", eta=0.01), sl)
    q = FakeQuantizer(3, mode="shift_log2")
    q.set_params(0.5, eta=0.01)
    assert torch.equal(q(sl), sl)


def test_mse_clips_outliers_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4000, generator=g) * 2 - 1
    x[0, 0] = 40.0  # channel 0 has one outlier, channel 1 none
    s_mm, z_mm = minmax_params(x, 4, axis=0)
    s, z = mse_params(x, 4, axis=0)
    err = lambda s, z: ((fake_quant_ref(x, s, z, 4, axis=0) - x) ** 2).mean(1)
    assert (err(s, z) <= err(s_mm, z_mm)).all()  # never worse than min-max (r = 1 is a candidate)
    assert s[0] < 0.5 * s_mm[0]  # the outlier's channel clips hard
    assert s[1] > 0.7 * s_mm[1]  # a uniform channel keeps (almost) its full range
    s_t, _ = mse_params(x, 4)  # per tensor: one scale
    assert s_t.shape == ()


def test_shift_log2_search_finds_the_grid():
    x = (2.0 ** (-0.5 * torch.arange(8.0)) - 0.01).repeat(10)  # exactly SULQ's 3-bit grid at s=0.5, eta=0.01
    s, z, eta = shift_log2_params(x, 3)
    assert z is None and math.isclose(eta.item(), 0.01, rel_tol=1e-6) and math.isclose(s.item(), 0.5, rel_tol=1e-5)
    assert 0.01 in ETAS
    probs = torch.softmax(torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3, -1)
    s, _, eta = shift_log2_params(probs, 4)
    e_sulq = ((fake_quant_ref(probs, s, None, 4, mode="shift_log2", eta=eta) - probs) ** 2).mean()
    e_fixed = ((fake_quant_ref(probs, 1.0, None, 4, mode="shift_log2", eta=1.0) - probs) ** 2).mean()
    assert e_sulq < e_fixed


# ------------------------------------------------------------------------------------ FakeQuantizer
def test_fake_quantizer_states():
    x = torch.randn(3, 5, 4)
    q = FakeQuantizer(4, axis=-1)
    assert not q.calibrated
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(x)
    q.enabled = False
    assert q(x) is x  # disabled: identity
    q.enabled, q.observing = True, True
    x2 = torch.randn(2, 7, 4) * 3
    assert q(x) is x and q(x2) is x2  # observing: records, returns x unchanged
    q.observing = False
    q.calibrate("minmax")
    s, z = minmax_params(torch.cat([x.reshape(-1, 4), x2.reshape(-1, 4)]), 4, axis=1)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)
    assert torch.equal(q(x), fake_quant_ref(x, s, z, 4, axis=2))
    # state dict: the (per-channel) buffers load into a fresh, empty quantiser
    q2 = FakeQuantizer(4, axis=-1)
    q2.load_state_dict(q.state_dict())
    assert q2.calibrated and torch.equal(q2(x), q(x))
    q.bits = 3  # another grid: parameters cleared, observations kept
    assert not q.calibrated
    q.calibrate("percentile", q=0.99)
    assert q.calibrated and q.bits == 3


def test_observation_memory_is_bounded_and_minmax_exact():
    q = FakeQuantizer(8, axis=-1, max_samples=64)
    q.observing = True
    xs = [torch.randn(10, 8) * (i + 1) for i in range(5)]
    for x in xs:
        q(x)
    assert q._sample.shape == (8, 8)  # 64 values in 8 channels
    q.calibrate("minmax")
    s, z = minmax_params(torch.cat(xs), 8, axis=1)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)  # exact running range, not the sample


def test_forward_goes_through_the_kernel_dispatcher(monkeypatch):
    calls = []
    real = fq_mod.fake_quant
    monkeypatch.setattr(fq_mod, "fake_quant", lambda *a, **k: calls.append(k["mode"]) or real(*a, **k))
    lin = QuantLinear.from_linear(nn.Linear(8, 4))
    lin.calibrate_weight()
    lin.a_quant.calibrate(x=torch.randn(16, 8))
    x = torch.randn(2, 8)
    y = lin(x)
    assert calls == ["uniform", "uniform"]  # input and weight
    # whichever path ran (Triton's interpreter under pytest on CPU, the kernel on CUDA), it equals the reference
    a, w = lin.a_quant, lin.w_quant
    expect = nn.functional.linear(fake_quant_ref(x, a.scale, a.zero_point, 8),
                                  fake_quant_ref(lin.weight, w.scale, w.zero_point, 8, axis=0), lin.bias)
    assert torch.equal(y, expect)


# ------------------------------------------------------------------------------------ modules and models
def test_quant_attention_disabled_equals_attention(reference):
    torch.manual_seed(0)
    attn = Attention(24, num_heads=3).eval()
    qa = QuantAttention.from_attention(attn, softmax_mode="log2", softmax_bits=4)
    assert set(qa.state_dict()) >= set(attn.state_dict())
    set_quant_state(qa, weights=False, acts=False)
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        assert torch.equal(qa(x), attn(x))
        ya, sa = attn(x, side=("probs",))
        yq, sq = qa(x, side=("probs",))
    assert torch.equal(ya, yq) and torch.equal(sa["probs"], sq["probs"])
    # enabled: the probabilities lie on the log2 grid (rounded to powers of two: coarse even at 8 bits)
    qa.softmax_quant.bits = 8
    qa.softmax_quant.set_params(1.0)
    for lin in (qa.qkv, qa.proj):
        lin.calibrate_weight()
        lin.a_quant.calibrate(x=x * 4)
    set_quant_state(qa, weights=True, acts=True)
    with torch.no_grad():
        yq, sq = qa(x, side=("probs",))
    p = sq["probs"][sq["probs"] > 0]
    assert torch.equal(p, 2.0 ** torch.round(torch.log2(p)))
    assert 0 < (yq - ya).abs().max() < 0.3 * ya.abs().max()


def test_quantize_model_disabled_is_exact_and_keys_match(course, reference):
    model, calib, (x, y) = course
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model(model, 4, 4, softmax_mode="shift_log2", act_per_channel=("qkv", "fc1"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # float model untouched
    names = list(quant_layers(q))
    assert names[0] == "patch_embed.proj" and names[1:5] == ["blocks.0.attn.qkv", "blocks.0.attn.proj",
                                                             "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert names[-1] == "head"
    assert quant_layers(q)["blocks.0.attn.qkv"].a_quant.axis == -1
    assert quant_layers(q)["blocks.0.attn.proj"].a_quant.axis is None
    assert quant_layers(q)["head"].w_bits == 8 and quant_layers(q)["blocks.3.mlp.fc2"].w_bits == 4
    q.load_state_dict(model.state_dict())  # a float state dict loads strictly
    fp = VisionTransformer(**{"embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 2.0})
    fp.load_state_dict(float_state_dict(q))  # and the weights load back
    set_quant_state(q, weights=False, acts=False)
    with torch.no_grad():
        assert torch.equal(q(x[:64]), model(x[:64]))
        assert torch.equal(fp(x[:64]), model(x[:64]))


def test_w8a8_close_w4a4_drops(course, reference):
    model, calib, (x, y) = course
    with torch.no_grad():
        lf = model(x)
        q8 = calibrate_model(quantize_model(model, 8, 8), calib, "minmax")
        l8 = q8(x)
    # 8-bit per-tensor activations: a few per cent of the largest logit at most (5.3 % on the current checkpoint, whose
    # post-LN outliers widen the per-tensor grids), and far below the 4-bit error checked further down
    err8 = ((l8 - lf).abs().max() / lf.abs().max()).item()
    assert err8 < 0.1, err8
    acc_fp, acc8 = (lf.argmax(-1) == y).float().mean().item(), (l8.argmax(-1) == y).float().mean().item()
    assert abs(acc8 - acc_fp) <= 0.01
    data = (x, y)
    # the naive baseline the chapter's methods beat: per-tensor min-max everywhere, softmax uniform
    q4 = calibrate_model(quantize_model(model, 4, 4, w_per_channel=False, softmax_mode="uniform"), calib, "minmax")
    acc4 = _acc(q4, data)
    with torch.no_grad():
        err4 = ((q4(x) - lf).abs().max() / lf.abs().max()).item()
    # W4A4 costs accuracy and a logit error many times W8A8's (the trained course ViT is robust enough that the
    # 4-bit drop is a few points on 256 images); at W3A3 the same naive recipe breaks down
    assert acc4 < acc_fp - 0.01 and err8 < 0.25 * err4, (acc_fp, acc8, acc4, err8, err4)
    q3 = calibrate_model(quantize_model(model, 3, 3, w_per_channel=False, softmax_mode="uniform"), calib, "minmax")
    assert _acc(q3, data) < acc_fp - 0.1, (acc_fp, _acc(q3, data))
    # quantisers save and load with the model
    q4b = quantize_model(model, 4, 4, w_per_channel=False, softmax_mode="uniform")
    q4b.load_state_dict(q4.state_dict())
    with torch.no_grad():
        assert torch.equal(q4b(data[0][:16]), q4(data[0][:16]))


def test_layer_bits_and_set_quant_state(course, reference):
    model, calib, _ = course
    q = quantize_model(model, 8, 8, layer_bits={"blocks.0.mlp.fc1": (4, 6)}, head=False, patch_embed=False)
    layers = quant_layers(q)
    assert "head" not in layers and "patch_embed.proj" not in layers and type(q.head) is nn.Linear
    assert (layers["blocks.0.mlp.fc1"].w_bits, layers["blocks.0.mlp.fc1"].a_bits) == (4, 6)
    calibrate_model(q, calib[:8], "percentile", q=0.999)
    set_quant_state(q, weights=False)
    assert not any(m.enabled for m in quantizers(q, "weights").values())
    assert all(m.enabled for m in quantizers(q, "acts").values())
    set_quant_state(q, acts=False, weights=True)
    assert all(m.enabled for m in quantizers(q, "weights").values())
    assert not any(m.enabled for m in quantizers(q, "acts").values())


# ------------------------------------------------------------------------------------ report
def test_sizes_and_bops_by_hand(reference):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
                          mlp_ratio=2.0).eval()
    q = quantize_model(m, 4, 4, softmax_mode="log2", softmax_bits=6)  # patch embed and head at 8/8
    x = torch.randn(2, 1, 8, 8)
    calibrate_model(q, x)
    rows = {r["name"]: r for r in quant_report(q, x)}
    n = 5  # tokens: 4 patches + CLS
    macs = {"patch_embed.proj": 4 * 8 * 16, "blocks.0.attn.qkv": n * 8 * 24, "blocks.0.attn.proj": n * 8 * 8,
            "blocks.0.mlp.fc1": n * 8 * 16, "blocks.0.mlp.fc2": n * 16 * 8, "head": 1 * 8 * 3,
            "blocks.0.attn.qk": n * n * 8, "blocks.0.attn.pv": n * n * 8}
    assert {k: r["macs"] for k, r in rows.items()} == macs
    bits = {"patch_embed.proj": (8, 8), "head": (8, 8), "blocks.0.attn.qk": (32, 32), "blocks.0.attn.pv": (32, 6)}
    expect = sum(v * math.prod(bits.get(k, (4, 4))) for k, v in macs.items())
    assert bops(q, x) == expect
    assert bops(q, x, matmuls=False) == expect - 200 * 32 * 32 - 200 * 32 * 6
    assert rows["blocks.0.attn.qkv"]["params"] == 8 * 24 + 24
    w = {"patch_embed.proj": (128, 8), "blocks.0.attn.qkv": (192, 4), "blocks.0.attn.proj": (64, 4),
         "blocks.0.mlp.fc1": (128, 4), "blocks.0.mlp.fc2": (128, 4), "head": (24, 8)}
    n_params = sum(p.numel() for p in m.parameters())
    n_q = sum(k for k, _ in w.values())
    assert model_size_bits(q) == sum(k * b for k, b in w.values()) + 32 * (n_params - n_q)
    assert model_size_bits(m) == 32 * n_params
    assert average_weight_bits(q) == sum(k * b for k, b in w.values()) / n_q
    set_quant_state(q, weights=False)
    assert average_weight_bits(q) == 32.0 and model_size_bits(q) == 32 * n_params


# ------------------------------------------------------------------------------------ bad input
def test_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="bits"):
        minmax_params(x, 9)
    with pytest.raises(TypeError, match="x must be"):
        minmax_params([1.0, 2.0], 4)
    with pytest.raises(ValueError, match="axis"):
        minmax_params(x, 4, axis=2)
    with pytest.raises(ValueError, match="q must be"):
        percentile_params(x, 4, q=0.2)
    with pytest.raises(ValueError, match="grid"):
        mse_params(x, 4, grid=[0.5, 1.5])
    with pytest.raises(ValueError, match="etas"):
        shift_log2_params(x.abs(), 4, etas=[-1.0])
    with pytest.raises(ValueError, match="NaN"):
        log2_params(torch.tensor([float("nan")]), 4)
    with pytest.raises(ValueError, match="lo must be <= hi"):
        range_params(torch.tensor(1.0), torch.tensor(-1.0), 4)
    with pytest.raises(ValueError, match="mode"):
        FakeQuantizer(4, mode="int")
    with pytest.raises(ValueError, match="bits"):
        FakeQuantizer(1)
    with pytest.raises(ValueError, match="method"):
        FakeQuantizer(4, mode="log2", method="mse")
    with pytest.raises(ValueError, match="symmetric"):
        FakeQuantizer(4, mode="log2", symmetric=True)
    with pytest.raises(RuntimeError, match="nothing observed"):
        FakeQuantizer(4).calibrate()
    q = FakeQuantizer(4)
    with pytest.raises(ValueError, match="zero_point"):
        q.set_params(0.1, 16)
    with pytest.raises(ValueError, match="scale must be > 0"):
        q.set_params(-0.1, 0)
    with pytest.raises(ValueError, match="1 element"):
        q.set_params(torch.ones(3), torch.zeros(3, dtype=torch.int32))
    m = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="model must be"):
        quantize_model("vit")
    with pytest.raises(ValueError, match="w_bits"):
        quantize_model(m, w_bits=1)
    with pytest.raises(ValueError, match="softmax_mode"):
        quantize_model(m, softmax_mode="exp")
    with pytest.raises(ValueError, match="layer_bits names"):
        quantize_model(m, layer_bits={"blocks.9.attn.qkv": (4, 4)})
    with pytest.raises(ValueError, match="match no layer"):
        quantize_model(m, act_per_channel=("fc9",))
    with pytest.raises(TypeError, match="act_per_channel"):
        quantize_model(m, act_per_channel="qkv")
    q = quantize_model(m)
    with pytest.raises(ValueError, match="method"):
        calibrate_model(q, torch.randn(2, 1, 8, 8), method="kl")
    with pytest.raises(TypeError, match="images"):
        calibrate_model(q, [1, 2])
    with pytest.raises(ValueError, match="no FakeQuantizer"):
        quant_layers(m)
    with pytest.raises(TypeError, match="weights"):
        set_quant_state(q, weights=1)
    with pytest.raises(TypeError, match="images"):
        quant_report(q, "images")
    with pytest.raises(ValueError, match="no FakeQuantizer"):
        bops(m, torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="qmodel"):
        model_size_bits(None)
    with pytest.raises(RuntimeError, match="not calibrated"):
        q(torch.randn(1, 1, 8, 8))


def test_mse_params_on_one_signed_channels():
    # all-positive and all-negative channels (a LayerNorm bias can do this): clipping keeps 0 inside the range
    from vitlab.quant.calibrate import minmax_params, mse_params

    x = torch.stack([torch.linspace(0.5, 4.0, 64), -torch.linspace(0.1, 2.0, 64), torch.linspace(-1.0, 3.0, 64)])
    s, z = mse_params(x, 4, axis=0)
    s0, z0 = minmax_params(x, 4, axis=0)
    assert (s > 0).all() and (s <= s0 + 1e-12).all() and ((z >= 0) & (z <= 15)).all()


def test_chapter_recipe_and_calibration_draws():
    # the settings the chapter-3 lessons and the compare notebook share, and the calibration draws used as seeds
    from vitlab.methods.quantization.recipes import RECIPE, calib_draw, ptq, recipe

    assert set(RECIPE) == {"smoke", "cpu", "gpu"} and RECIPE["cpu"]["seeds"] >= 3
    r = recipe("cpu")
    r["seeds"] = 0  # a copy: the shared table is not changed
    assert RECIPE["cpu"]["seeds"] >= 3
    with pytest.raises(ValueError, match="unknown profile"):
        recipe("laptop")
    images = torch.arange(20.0).reshape(20, 1, 1, 1)
    a, b, a2 = calib_draw(images, 8, 0), calib_draw(images, 8, 1), calib_draw(images, 8, 0)
    assert torch.equal(a, a2) and not torch.equal(a, b)  # the same seed, the same images; another seed, others
    assert a.flatten().unique().numel() == 8  # drawn without replacement
    with pytest.raises(ValueError, match="n=21"):
        calib_draw(images, 21, 0)
    with pytest.raises(TypeError, match="images"):
        calib_draw(images.flatten(), 2, 0)
    with pytest.raises(ValueError, match="unknown method"):
        ptq("kmeans", nn.Linear(2, 2), images, bits=4)
