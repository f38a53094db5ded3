"""Chapter 6's comparison helpers (vitlab.methods.robustness.compare): entry names, the corruption sweep against
corrupt() by hand, the summaries (means, severity curve, mCE) on hand-made dicts, PGD accuracy, throughput, the dense
table's mapping of the PH-Reg / DVT caches, the availability guard, and bad input."""
import pytest
import torch
import torch.nn as nn

from tests.model_helpers import tiny_vit
from vitlab import zoo
from vitlab.data import CORRUPTIONS, corrupt
from vitlab.methods.robustness import compare as C


class Constant(nn.Module):
    """Always predicts class ``k`` (a parameter so that it is a model with a device and gradients)."""

    def __init__(self, k=0, num_classes=5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_classes))
        with torch.no_grad():
            self.bias[k] = 1.0

    def forward(self, x):
        return self.bias.expand(len(x), -1) + 0 * x.flatten(1)[:, :1]


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _meas(acc_of):
    """A measure()-shaped dict with acc_<kind>_<s> = acc_of(kind, s) and clean 0.9."""
    return {"clean": 0.9, **{f"acc_{k}_{s}": acc_of(k, s) for k in CORRUPTIONS for s in C.SEVERITIES}}


def test_entries_are_the_lessons_checkpoints():
    assert C.classifier_entry("vit", 0) == "ch1_vit_digits_s0"
    assert C.classifier_entry("cnn", 1) == "ch6_cnn_digits_s1"
    assert C.classifier_entry("tap_adl", 2) == "ch6_tapadl_tap_adl_digits_s2"
    assert C.classifier_entry("t1", 0) == "ch6_vit_t1p0_digits_s0"
    assert C.classifier_entry("t3", 0) == "ch6_vit_t3p0_digits_s0"
    for key in C.CLASSIFIERS:
        for seed in C.SEEDS:
            assert C.classifier_entry(key, seed) in zoo.ZOO
    assert set(C.CONTROL) == set(C.CLASSIFIERS) - {"vit"} and set(C.CONTROL.values()) <= set(C.CLASSIFIERS)
    with pytest.raises(ValueError, match="key"):
        C.classifier_entry("resnet", 0)
    with pytest.raises(ValueError, match="seed"):
        C.classifier_entry("vit", 7)


def test_corruption_accuracies_match_corrupt_by_hand():
    x, y = _data()
    vit = tiny_vit().train()
    out = C.corruption_accuracies(vit, x, y, kinds=("blur", "patch_shuffle"), severities=(1, 5), batch_size=5)
    assert sorted(out) == ["acc_blur_1", "acc_blur_5", "acc_patch_shuffle_1", "acc_patch_shuffle_5"]
    assert vit.training  # mode restored
    vit.eval()
    with torch.no_grad():
        want = (vit(corrupt(x, "patch_shuffle", 5, seed=0, patch_size=C.PATCH)).argmax(-1) == y).float().mean()
    assert out["acc_patch_shuffle_5"] == pytest.approx(want.item())
    # a constant classifier scores the share of its class whatever the corruption
    full = C.corruption_accuracies(Constant(2), x, y)
    assert len(full) == len(CORRUPTIONS) * 5
    assert all(v == pytest.approx((y == 2).float().mean().item()) for v in full.values())


def test_summaries_by_hand():
    m = _meas(lambda k, s: 1.0 - 0.1 * s)  # 0.9 .. 0.5 for every kind
    means = C.corruption_means(m)
    assert means["all"] == pytest.approx(0.7) and means["blur"] == pytest.approx(0.7)
    assert C.severity_curve(m) == pytest.approx([0.9, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert C.mce(m, m) == pytest.approx(1.0)
    half = _meas(lambda k, s: 1.0 - 0.05 * s)  # half the errors
    assert C.mce(half, m) == pytest.approx(0.5)
    one_kind = _meas(lambda k, s: 1.0 - (0.2 if k == "blur" else 0.1) * s)  # twice the errors on blur only
    assert C.mce(one_kind, m) == pytest.approx((2 + 4) / 5)
    with pytest.raises(ValueError, match="values"):
        C.corruption_means({"clean": 1.0})
    with pytest.raises(ValueError, match="no error"):
        C.mce(m, _meas(lambda k, s: 1.0))
    with pytest.raises(ValueError, match="lacks"):
        C.corruption_means({"acc_blur_1": 0.5})


def test_pgd_accuracy_cannot_beat_clean():
    x, y = _data(16)
    vit = tiny_vit()
    with torch.no_grad():
        clean = (vit(x).argmax(-1) == y).float().mean().item()
    assert C.pgd_accuracy(vit, x, y, eps=0.3, steps=5) <= clean
    with pytest.raises(ValueError, match="eps"):
        C.pgd_accuracy(vit, x, y, eps=0.0)


def test_throughput():
    x, _ = _data(8)
    out = C.throughput({"a": tiny_vit(), "b": tiny_vit(depth=1)}, x, rounds=2, repeats=1, warmup=0)
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    with pytest.raises(TypeError, match="models"):
        C.throughput({}, x)
    with pytest.raises(ValueError, match="images"):
        C.throughput({"a": tiny_vit()}, x[0])
    with pytest.raises(ValueError, match="rounds"):
        C.throughput({"a": tiny_vit()}, x, rounds=0)


def test_dense_rows_map_both_caches():
    phreg = {f"{m}/{k}": v for m, base in (("vit", 0.1), ("teacher", 0.2), ("student", 0.3), ("control", 0.4))
             for k, v in (("miou", base + 0.5), ("position_share", base), ("smooth_score", base / 10))}
    dvt = {f"{m}/{k}": v for m, base in (("raw", 0.1), ("stage2", 0.05), ("control", 0.12))
           for k, v in (("miou", base + 0.5), ("share", base))}
    rows = C.dense_rows(phreg, dvt)
    assert list(rows) == list(C.DENSE_ROWS)
    assert rows["raw ViT features"] == {"miou": 0.6, "position_share": 0.1, "smooth_score": 0.01}
    assert rows["PH-Reg student (4 registers)"] == {"miou": 0.8, "position_share": 0.3, "smooth_score": 0.03}
    assert rows["DVT denoised (stage 2)"] == {"miou": 0.55, "position_share": 0.05, "smooth_score": None}
    with pytest.raises(ValueError, match="dvt"):
        C.dense_rows(phreg, {"stage2/miou": 1.0})


def test_available_never_trains(tmp_path, monkeypatch):
    assert zoo.available("ch1_vit_digits_s0", "cpu")  # committed
    monkeypatch.setenv("VITLAB_CHECKPOINTS", str(tmp_path))
    assert not zoo.available("ch1_vit_digits_s0", "cpu")  # no file: False, and nothing trained or written
    assert not list(tmp_path.iterdir())
    (tmp_path / "ch1_vit_digits_s0-cpu.pt").write_bytes(b"not a checkpoint")
    assert not zoo.available("ch1_vit_digits_s0", "cpu")
    with pytest.raises(ValueError, match="unknown"):
        zoo.available("no_such_entry", "cpu")


def test_bad_input():
    x, y = _data()
    with pytest.raises(TypeError, match="model"):
        C.corruption_accuracies("vit", x, y)
    with pytest.raises(ValueError, match="labels"):
        C.corruption_accuracies(tiny_vit(), x, y[:3])
    with pytest.raises(ValueError, match="kinds"):
        C.corruption_accuracies(tiny_vit(), x, y, kinds=("fog",))
    with pytest.raises(ValueError, match="severities"):
        C.corruption_accuracies(tiny_vit(), x, y, severities=(0,))
    with pytest.raises(TypeError, match="model"):
        C.measure(None)
