import math

import pytest
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from vitlab import measure


def tiny_vit(depth=2):
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=depth,
                             num_heads=4)


class Constant(nn.Module):
    """Always predicts class `c` (logits one-hot), whatever the input."""

    def __init__(self, num_classes=4, c=2):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(num_classes))
        self.c = c

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.w.numel())
        out[:, self.c] = 1.0
        return out + 0 * self.w


class Toy:
    """Stands in for vitlab.data.ImageDataset: .images, .labels, .num_classes."""

    def __init__(self, n_per_class=5, num_classes=4):
        self.labels = torch.arange(num_classes).repeat_interleave(n_per_class)
        self.images = torch.rand(len(self.labels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
        self.num_classes = num_classes


# ----------------------------------------------------------------------------- accuracy

def test_constant_classifier_on_balanced_set_scores_one_over_c():
    ds = Toy(n_per_class=5, num_classes=4)
    m = Constant(4, c=2)
    assert measure.accuracy(m, ds, batch_size=3) == pytest.approx(1 / 4)
    assert measure.accuracy(m, (ds.images, ds.labels)) == pytest.approx(1 / 4)
    pc = measure.per_class_accuracy(m, ds)
    assert pc.tolist() == [0.0, 0.0, 1.0, 0.0]


def test_per_class_accuracy_nan_for_missing_class():
    ds = Toy(n_per_class=2, num_classes=3)
    pc = measure.per_class_accuracy(Constant(5, c=0), ds, num_classes=5)
    assert pc[0] == 1.0 and pc[1] == 0.0 and math.isnan(pc[3]) and math.isnan(pc[4])


def test_predict_shape_and_mode_restored():
    m = tiny_vit()
    m.train()
    x = torch.rand(7, 1, 28, 28)
    logits = measure.predict(m, (x, torch.zeros(7, dtype=torch.long)), batch_size=3)
    assert logits.shape == (7, 10) and m.training
    # batching does not change the answer, and a bare image tensor works too
    torch.testing.assert_close(logits, measure.predict(m, x, batch_size=7), rtol=1e-5, atol=1e-5)
    m.eval()
    measure.accuracy(m, (x, torch.zeros(7, dtype=torch.long)))
    assert not m.training


# ----------------------------------------------------------------------------- params and flops

def test_count_params():
    m = tiny_vit()
    assert measure.count_params(m) == sum(p.numel() for p in m.parameters())
    m.head.requires_grad_(False)
    assert measure.count_params(m, trainable_only=True) == measure.count_params(m) - 10 * 64 - 10


def test_flops_linear_is_two_mn_per_sample():
    lin = nn.Linear(10, 20)
    x = torch.randn(4, 10)
    assert measure.flops(lin, x) == 2 * 10 * 20
    assert measure.flops(lin, x, per_sample=False) == 4 * 2 * 10 * 20
    assert measure.macs(lin, x) == 10 * 20


def test_flops_vit_scales_linearly_with_depth_and_counts_attention():
    x = torch.rand(2, 1, 28, 28)
    f = {d: measure.flops(tiny_vit(d), x) for d in (1, 2, 4)}
    assert f[1] > 0
    per_block = f[2] - f[1]
    assert f[4] - f[2] == 2 * per_block  # every block costs the same
    assert 1.8 < f[4] / f[2] < 2.0
    # one block, N = 49 patches + CLS, d = 64: linear layers 2*N*(4+2*4)*d^2, attention 2 * 2*N^2*d
    n, d = 50, 64
    assert per_block == 2 * n * 12 * d * d + 4 * n * n * d


def test_flops_restores_mode_and_takes_tuples():
    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, a, b):
            return self.lin(a) + b

    m = Add().train()
    assert measure.flops(m, (torch.randn(2, 3), torch.randn(2, 3))) == 2 * 3 * 3
    assert m.training


# ----------------------------------------------------------------------------- latency, tokens, summary

def test_latency_positive_and_respects_repeats():
    calls = []

    class Counting(nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    m = Counting(16, 16)
    r = measure.latency(m, torch.randn(8, 16), warmup=2, repeats=5)
    assert len(calls) == 7 and r["repeats"] == 5 and r["batch_size"] == 8
    assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["throughput"] > 0
    assert r["throughput"] == pytest.approx(8 / (r["median_ms"] / 1e3))


def test_token_cost():
    dense = measure.token_cost([50] * 4, 50, dim=64)
    assert dense == {"mean_tokens": 50.0, "linear": 1.0, "attention": 1.0, "total": 1.0}
    half = measure.token_cost([50, 50, 25, 25], 50)
    assert half["mean_tokens"] == 37.5 and half["linear"] == 0.75
    assert half["attention"] == pytest.approx((2 + 2 * 0.25) / 4)
    tot = measure.token_cost([50, 50, 25, 25], 50, dim=64)["total"]
    assert half["attention"] < tot < half["linear"]  # linear layers dominate at this width


def test_summary_row():
    m = tiny_vit(1)
    ds = Toy(n_per_class=3, num_classes=10)
    ds.images = torch.rand(30, 1, 28, 28)
    row = measure.summary(m, ds, ds.images[:4], warmup=1, repeats=2)
    assert set(row) == {"accuracy", "params", "gflops", "latency_ms", "latency_iqr_ms", "throughput"}
    assert 0 <= row["accuracy"] <= 1 and row["params"] == measure.count_params(m)
    assert row["gflops"] == measure.flops(m, ds.images[:1]) / 1e9


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, err, match", [
    (lambda m, ds: measure.accuracy("model", ds), TypeError, "model must be a torch.nn.Module"),
    (lambda m, ds: measure.accuracy(m, [1, 2, 3]), TypeError, "data must have .images and .labels"),
    (lambda m, ds: measure.accuracy(m, (ds.images, ds.labels[:-1])), ValueError, "disagree on N"),
    (lambda m, ds: measure.accuracy(m, (ds.images, ds.labels.float())), TypeError, "labels must be an integer"),
    (lambda m, ds: measure.accuracy(m, ds, batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
    (lambda m, ds: measure.per_class_accuracy(m, ds, num_classes=2), ValueError, r"labels must lie in \[0, 2\)"),
    (lambda m, ds: measure.flops(m, [1, 2]), TypeError, "inputs must be a tensor"),
    (lambda m, ds: measure.flops(m, ()), TypeError, "inputs must be a tensor"),
    (lambda m, ds: measure.latency(m, ds.images, repeats=0), ValueError, "repeats must be an int >= 1, got 0"),
    (lambda m, ds: measure.latency(m, ds.images, warmup=-1), ValueError, "warmup must be an int >= 0"),
    (lambda m, ds: measure.latency(m, ds.images, repeats=2.5), ValueError, "repeats must be an int"),
    (lambda m, ds: measure.token_cost([], 50), ValueError, "at least one block"),
    (lambda m, ds: measure.token_cost([10, 0], 50), ValueError, "ints >= 1, got 0"),
    (lambda m, ds: measure.token_cost(12, 50), TypeError, "tokens_per_block must be a list"),
    (lambda m, ds: measure.token_cost([10], -1), ValueError, "n_dense must be an int >= 1, got -1"),
    (lambda m, ds: measure.count_params(None), TypeError, "count_params: model"),
])
def test_bad_inputs_raise(call, err, match):
    with pytest.raises(err, match=match):
        call(Constant(4), Toy())


def test_model_returning_non_tensor_raises():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="logits tensor"):
        measure.accuracy(Pair(), Toy())
