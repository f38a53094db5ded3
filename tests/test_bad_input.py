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
from vitlab.tokens import gather_tokens
from vitlab.train import evaluate, fit

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
    # fit: every hyper-parameter finite and in range, data and labels that fit the model
    ("negative grad_clip", lambda: fit(tiny(), (X, Y), epochs=1, grad_clip=-1, progress=False), ValueError,
     "grad_clip"),
    ("zero grad_clip", lambda: fit(tiny(), (X, Y), epochs=1, grad_clip=0, progress=False), ValueError, "grad_clip"),
    ("infinite lr", lambda: fit(tiny(), (X, Y), epochs=1, lr=float("inf"), progress=False), ValueError, "lr"),
    ("nan lr", lambda: fit(tiny(), (X, Y), epochs=1, lr=float("nan"), progress=False), ValueError, "lr"),
    ("string lr", lambda: fit(tiny(), (X, Y), epochs=1, lr="1e-3", progress=False), TypeError, "lr"),
    ("negative weight_decay", lambda: fit(tiny(), (X, Y), epochs=1, weight_decay=-0.1, progress=False), ValueError,
     "weight_decay"),
    ("negative warmup", lambda: fit(tiny(), (X, Y), epochs=1, warmup=-1, progress=False), ValueError, "warmup"),
    ("shift as large as the image", lambda: fit(tiny(), (X, Y), epochs=1, shift=28, progress=False), ValueError,
     "shift"),
    ("float shift", lambda: fit(tiny(), (X, Y), epochs=1, shift=1.5, progress=False), ValueError, "shift"),
    ("nan seconds", lambda: fit(tiny(), (X, Y), seconds=float("nan"), progress=False), ValueError, "seconds"),
    ("string label_smoothing", lambda: fit(tiny(), (X, Y), epochs=1, label_smoothing="0.1", progress=False),
     ValueError, "label_smoothing"),
    ("float labels", lambda: fit(tiny(), (X, Y.float()), epochs=1, progress=False), TypeError, "labels"),
    ("labels past the classes", lambda: fit(tiny(), (X, Y + 10), epochs=1, progress=False), ValueError,
     r"labels must be in 0..9"),
    ("negative labels", lambda: fit(tiny(), (X, Y - 20), epochs=1, progress=False), ValueError, "labels"),
    ("NaN pixels", lambda: fit(tiny(), (X.clone().fill_(float("nan")), Y), epochs=1, progress=False), ValueError,
     "NaN"),
    ("integer images", lambda: fit(tiny(), ((X * 255).to(torch.uint8), Y), epochs=1, progress=False), TypeError,
     "floating point"),
    ("train is None", lambda: fit(tiny(), None, epochs=1, progress=False), TypeError, "train"),
    ("model is None", lambda: fit(None, (X, Y), epochs=1, progress=False), TypeError, "model"),
    ("optimizer factory returns junk", lambda: fit(tiny(), (X, Y), epochs=1, optimizer=lambda m, lr, wd: "sgd",
                                                   progress=False), TypeError, "optimizer factory"),
    ("bool batch size", lambda: fit(tiny(), (X, Y), epochs=1, batch_size=True, progress=False), ValueError,
     "batch_size"),
    ("evaluate batch size", lambda: evaluate(tiny(), (X, Y), batch_size=-5), ValueError, "batch_size"),
    ("evaluate without data", lambda: evaluate(tiny(), None), TypeError, "data"),
    ("evaluate labels", lambda: evaluate(tiny(), (X, Y + 10)), ValueError, "labels"),
    ("evaluate model", lambda: evaluate("vit", (X, Y)), TypeError, "model"),
    # the model: constructor arguments and the input's dtype
    ("zero mlp_ratio", lambda: VisionTransformer(mlp_ratio=0), ValueError, "mlp_ratio"),
    ("negative mlp_ratio", lambda: VisionTransformer(mlp_ratio=-1), ValueError, "mlp_ratio"),
    ("string mlp_ratio", lambda: VisionTransformer(mlp_ratio="4"), TypeError, "mlp_ratio"),
    ("drop_path_rate above 1", lambda: VisionTransformer(drop_path_rate=1.5), ValueError, "drop_path_rate"),
    ("negative drop_rate", lambda: VisionTransformer(drop_rate=-0.1), ValueError, "drop_rate"),
    ("float64 input", lambda: tiny()(X.double()), TypeError, "float64"),
    ("uint8 input", lambda: tiny()((X * 255).to(torch.uint8)), TypeError, "uint8"),
    ("bf16 input without autocast", lambda: tiny()(X.bfloat16()), TypeError, "autocast"),
    ("corrupt out of range", lambda: data.corrupt(X * 2, "blur", 1), ValueError, r"\[0, 1\]"),
    ("corrupt NaN", lambda: data.corrupt(X.clone().fill_(float("nan")), "blur", 1), ValueError, "images"),
    ("gather out of range", lambda: gather_tokens(torch.rand(2, 5, 3), torch.tensor([[0, 5], [1, 2]])), ValueError,
     r"0..4"),
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
