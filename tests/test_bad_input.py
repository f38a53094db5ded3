"""Every public entry point rejects bad input with a ValueError/TypeError that names the argument and what
was expected. One table, so the list of guarded mistakes is easy to read and extend."""
import time

import pytest
import torch

from vitlab import data, zoo
from vitlab.models import Attention, CrossAttention, PatchEmbed, VisionTransformer, create_model, window_partition
from vitlab.profiles import profile
from vitlab.results import record
from vitlab.seed import seed_everything
from vitlab.train import fit

X, Y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))


def tiny():
    return create_model("vit_nano", depth=1)


CASES = [
    # (id, callable, exception, message fragment)
    ("image size", lambda: tiny()(torch.rand(2, 1, 32, 32)), ValueError, "img_size=28"),
    ("channels", lambda: tiny()(torch.rand(2, 3, 28, 28)), ValueError, "in_chans=1"),
    ("not a batch", lambda: tiny()(torch.rand(1, 28, 28)), ValueError, r"\[B, C, H, W\]"),
    ("patch does not divide", lambda: PatchEmbed(img_size=28, patch_size=5), ValueError, "patch_size=5"),
    ("patch not int", lambda: PatchEmbed(img_size=28, patch_size=4.0), ValueError, "patch_size"),
    ("heads do not divide", lambda: VisionTransformer(embed_dim=64, num_heads=6), ValueError, "num_heads=6"),
    ("zero depth", lambda: VisionTransformer(depth=0), ValueError, "depth"),
    ("bad pool", lambda: VisionTransformer(global_pool="max"), ValueError, "global_pool"),
    ("token pool without CLS", lambda: VisionTransformer(class_token=False), ValueError, "class_token"),
    ("unknown model", lambda: create_model("vit_huge_typo"), ValueError, "valid models"),
    ("model name type", lambda: create_model(3), TypeError, "name"),
    ("unknown override", lambda: create_model("vit_nano", wings=2), TypeError, "wings"),
    ("unknown side output", lambda: tiny().forward_with_attention(X, side=("rows",)), ValueError, "side"),
    ("attention heads", lambda: Attention(10, num_heads=3), ValueError, "num_heads=3"),
    ("cross-attention batch", lambda: CrossAttention(8, 2)(torch.rand(2, 1, 8), torch.rand(3, 4, 8)), ValueError,
     "same B"),
    ("window does not divide", lambda: window_partition(torch.rand(1, 6, 6, 4), 4), ValueError, "window_size=4"),
    ("unknown profile", lambda: profile("laptop"), ValueError, "valid profiles"),
    ("profile type", lambda: profile(3), TypeError, "profile"),
    ("unknown dataset", lambda: data.load("imagenet", "train"), ValueError, "mnist5k"),
    ("unknown split", lambda: data.load("mnist5k", "dev"), ValueError, "split"),
    ("offline CIFAR", lambda: data.load("cifar10", "train", "smoke", allow_download=False), ValueError,
     "allow_download"),
    ("negative seconds", lambda: fit(tiny(), (X, Y), seconds=-1, progress=False), ValueError, "seconds"),
    ("zero epochs", lambda: fit(tiny(), (X, Y), epochs=0, progress=False), ValueError, "epochs"),
    ("epochs and seconds", lambda: fit(tiny(), (X, Y), epochs=1, seconds=1, progress=False), ValueError,
     "one of epochs, seconds or steps"),
    ("unknown optimizer", lambda: fit(tiny(), (X, Y), epochs=1, optimizer="adam2", progress=False), ValueError,
     "optimizer"),
    ("unknown schedule", lambda: fit(tiny(), (X, Y), epochs=1, schedule="step", progress=False), ValueError,
     "schedule"),
    ("train data type", lambda: fit(tiny(), [1, 2, 3], epochs=1, progress=False), TypeError, "train"),
    ("label smoothing", lambda: fit(tiny(), (X, Y), epochs=1, label_smoothing=1.5, progress=False), ValueError,
     "label_smoothing"),
    ("batch size", lambda: fit(tiny(), (X, Y), epochs=1, batch_size=0, progress=False), ValueError, "batch_size"),
    ("unknown checkpoint", lambda: zoo.get("vit_giant_imagenet"), ValueError, "valid names"),
    ("negative seed", lambda: seed_everything(-1), ValueError, "seed"),
    ("results name", lambda: record("my lesson!", "x"), ValueError, "lesson"),
    ("corruption severity", lambda: data.corrupt(torch.rand(1, 1, 8, 8), "blur", 9), ValueError, "severity"),
    ("corruption kind", lambda: data.corrupt(torch.rand(1, 1, 8, 8), "rain", 1), ValueError, "kind"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_offline_cifar_fails_at_once():
    t = time.perf_counter()
    with pytest.raises(ValueError):
        data.load("cifar100", "test", "cpu")
    assert time.perf_counter() - t < 1.0
