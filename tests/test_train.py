"""fit: schedules, determinism, time budgets, and DDP equal to one process on the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitlab.models import create_model
from vitlab.seed import seed_everything
from vitlab.train import evaluate, fit, lr_lambda, random_shift

ROOT = Path(__file__).resolve().parents[1]


def toy(n=256, seed=0):
    """A learnable toy task: the class is which quadrant of an 8×8 image is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 0.7
    return x, y


def train_once(seed=0, **kw):
    seed_everything(seed)
    m = create_model("vit_nano", img_size=8, num_classes=4, depth=2)
    h = fit(m, toy(), toy(64, seed=1), profile="smoke", batch_size=32, seed=seed, progress=False, **kw)
    return m, h


def test_fit_learns_and_returns_a_history():
    m, h = train_once(epochs=10, lr=1e-2, shift=0)
    assert set(h) >= {"epoch", "train_loss", "val_acc", "lr", "seconds"}
    assert len(h["epoch"]) == 10 and h["train_loss"][-1] < h["train_loss"][0]
    assert evaluate(m, toy(64, seed=1))["acc"] > 0.6  # chance is 0.25


def test_same_seed_same_numbers():
    _, a = train_once(epochs=2)
    _, b = train_once(epochs=2)
    assert a["train_loss"] == b["train_loss"] and a["val_acc"] == b["val_acc"]


def test_warmup_then_cosine_to_zero():
    f = lr_lambda(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)


def test_seconds_budget_fixes_a_step_count():
    _, h = train_once(seconds=2.0)
    assert h["step"][-1] >= 1 and h["seconds"][-1] < 10


def test_seconds_budget_calls_a_stateful_step_once_per_step():
    """The timing probe's steps are real steps (at lr 0), not extra calls a stateful step_fn would count."""
    import torch.nn.functional as F

    calls = []

    def step_fn(net, x, y):
        calls.append(len(x))
        logits = net(x)
        return F.cross_entropy(logits, y), logits

    _, h = train_once(seconds=1.0, step_fn=step_fn)
    assert len(calls) == h["step"][-1] >= 4
    assert h["lr"][0] > 0  # the schedule runs after the probe's lr-0 steps


def test_steps_budget_runs_exactly_that_many_steps():
    _, h = train_once(steps=11)  # 256 images, batch 32: 8 steps per pass, so a second, partial pass
    assert h["step"] == [8, 11] and h["lr"][-1] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="steps must be"):
        train_once(steps=0)
    with pytest.raises(ValueError, match="one of epochs, seconds or steps"):
        train_once(steps=3, epochs=1)


def test_random_shift_is_a_translation():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = random_shift(x, torch.tensor([[1, 0]]))
    assert torch.equal(out[0, 0, :3], x[0, 0, 1:])  # moved up by one row, border replicated
    assert torch.equal(random_shift(x, torch.tensor([[0, 0]])), x)


def test_ddp_two_processes_follow_the_single_process_trajectory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    single, double = tmp_path / "single.json", tmp_path / "ddp.json"
    worker = str(ROOT / "tests" / "ddp_worker.py")
    subprocess.run([sys.executable, worker, str(single)], check=True, env=env, timeout=300)
    # torchrun's standalone rendezvous picks a free port, then binds it: another process on a busy CI machine
    # can take it in between. One retry absorbs that race; a real failure fails twice and shows its stderr.
    for attempt in range(2):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              worker, str(double)], env=env, timeout=300, capture_output=True, text=True)
        if run.returncode == 0:
            break
    assert run.returncode == 0, f"torchrun failed twice; last stderr:\n{run.stderr[-4000:]}"
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_step_fn_replaces_forward_and_loss():
    import torch.nn.functional as F

    calls = []

    def plain_step(net, x, y):  # what fit does by default, written as a step_fn
        calls.append(len(x))
        logits = net(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=0.1), logits

    _, default = train_once(epochs=2, shift=0)
    _, custom = train_once(epochs=2, shift=0, step_fn=plain_step)
    assert custom["train_loss"] == default["train_loss"] and custom["val_acc"] == default["val_acc"]
    assert calls and set(calls) == {32}


def test_step_fn_and_loss_fn_are_exclusive():
    with pytest.raises(ValueError, match="loss_fn or step_fn"):
        train_once(epochs=1, loss_fn=lambda a, b: a.sum(), step_fn=lambda n, x, y: (x.sum(), x))
    with pytest.raises(TypeError, match="step_fn must be callable"):
        train_once(epochs=1, step_fn=3)


def test_fit_does_not_augment_unless_asked():
    # augmentation is a recipe choice a lesson states (fit(..., shift=2)), never a silent default
    import inspect

    assert inspect.signature(fit).parameters["shift"].default == 0


def test_a_non_finite_loss_stops_training_at_its_step():
    calls = []

    def loss_fn(logits, y):
        calls.append(1)
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(FloatingPointError, match="not finite .* at step 3"):
        train_once(epochs=1, loss_fn=loss_fn)


def test_train_acc_counts_the_images_a_short_batch_really_has():
    # 8 images, batch_size 32: each step sees 8 images, so train_acc is correct / 8, never correct / 32
    seed_everything(0)
    m = create_model("vit_nano", img_size=8, num_classes=4, depth=1)
    x, y = toy(8)
    h = fit(m, (x, y), profile="smoke", epochs=1, batch_size=32, progress=False)
    m.train()
    assert h["train_acc"][0] in {k / 8 for k in range(9)}


def test_adamw_lr_scaled_splits_timms_groups():
    """The chosen parameters get scale x lr, in timm's decay / no-decay groups; every parameter appears once."""
    import torch.nn as nn

    from vitlab.train import adamw_lr_scaled

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = adamw_lr_scaled(lambda m: m[2].parameters(), 10.0)(model, 1e-3, 0.05)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())
    assert by_id[id(model[2].weight)]["lr"] == pytest.approx(1e-2) and by_id[id(model[0].weight)]["lr"] == 1e-3
    assert by_id[id(model[2].weight)]["weight_decay"] == 0.05 and by_id[id(model[2].bias)]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="scale"):
        adamw_lr_scaled(lambda m: [], 0)


def multilabel_toy(n=256, seed=0):
    """Multi-label toy: each of 4 quadrants is independently bright (target 1) or not."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 4, generator=g) < 0.4).float()
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    for k in range(4):
        r, q = divmod(k, 2)
        x[:, 0, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 0.6 * y[:, k, None, None]
    return x, y


def test_multilabel_targets_train_with_bce_and_report_auc():
    seed_everything(0)
    m = create_model("vit_nano", img_size=8, num_classes=4, depth=2)
    h = fit(m, multilabel_toy(), multilabel_toy(128, seed=1), profile="smoke", batch_size=32, epochs=12, lr=1e-2,
            progress=False)
    assert len(h["val_auc"]) == 12 and h["train_loss"][-1] < h["train_loss"][0]
    ev = evaluate(m, multilabel_toy(128, seed=2))
    assert ev["auc"] > 0.8 and ev["acc"] > 0.7 and set(ev) == {"loss", "acc", "auc"}
    assert 0 <= h["train_acc"][-1] <= 1


def test_multilabel_loss_is_bce_with_per_class_smoothing():
    import torch.nn.functional as F

    from vitlab.train import multilabel_loss

    logits, y = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    assert multilabel_loss(logits, y) == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item())
    smoothed = torch.tensor([[0.95, 0.05]])  # epsilon 0.1: 1 -> 1 - 0.05, 0 -> 0.05
    assert multilabel_loss(logits, y, 0.1) == pytest.approx(F.binary_cross_entropy_with_logits(logits, smoothed).item())


def test_multilabel_bad_targets_are_named():
    m = create_model("vit_nano", img_size=8, num_classes=4, depth=2)
    x, y = multilabel_toy(32)
    with pytest.raises(ValueError, match="have 3 columns but the model has 4 outputs"):
        fit(m, (x, y[:, :3]), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        fit(m, (x, y * 2), epochs=1, progress=False)
    with pytest.raises(TypeError, match="must be floating point 0/1"):
        fit(m, (x, y.long()), epochs=1, progress=False)
    with pytest.raises(ValueError, match="must be of one kind"):
        fit(m, (x, y), toy(32), epochs=1, progress=False)


def test_a_self_supervised_step_fn_returns_no_logits():
    seed_everything(0)
    m = create_model("vit_nano", img_size=8, num_classes=4, depth=2)
    h = fit(m, toy(64), profile="smoke", batch_size=32, epochs=2, progress=False,
            step_fn=lambda net, x, y: ((net(x) ** 2).mean(), None))
    assert len(h["train_loss"]) == 2 and all(a != a for a in h["train_acc"])  # nan: nothing classified


def test_fit_trains_on_masks_with_a_dense_step_fn():
    import torch.nn.functional as F

    from vitlab.data import ImageDataset

    x, y = toy()
    masks = x[:, 0] > 0.5  # the bright quadrant, per pixel
    ds = ImageDataset(x, y, name="toy", split="train", classes=list("abcd"), masks=masks)
    seen = []

    def dense_step(net, images, targets):
        seen.append((targets.dtype, tuple(targets.shape)))
        return F.cross_entropy(net(images), targets), None

    seed_everything(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    h = fit(net, ds, None, profile="smoke", steps=60, batch_size=32, lr=5e-2, progress=False, step_fn=dense_step,
            targets="masks")
    assert seen[0] == (torch.int64, (32, 8, 8)) and h["train_loss"][-1] < h["train_loss"][0]
    assert ((net(x).argmax(1) == masks).float().mean()) > 0.9
    with pytest.raises(ValueError, match="targets must be"):
        fit(net, ds, None, profile="smoke", steps=1, step_fn=dense_step, targets="pixels", progress=False)
    with pytest.raises(ValueError, match="needs a step_fn"):
        fit(net, ds, None, profile="smoke", steps=1, targets="masks", progress=False)
    with pytest.raises(ValueError, match="shift=0"):
        fit(net, ds, None, profile="smoke", steps=1, step_fn=dense_step, targets="masks", shift=1, progress=False)
    with pytest.raises(ValueError, match="masks"):
        fit(net, (x, y), None, profile="smoke", steps=1, step_fn=dense_step, targets="masks", progress=False)


def test_fit_takes_volumes_with_a_step_fn():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    vols, labels = torch.rand(64, 1, 4, 4, 4, generator=g), torch.randint(0, 2, (64,), generator=g)
    vols[labels == 1, :, :2] += 1.0  # class 1: bright front half

    def step(net, x, y):
        assert x.ndim == 5
        return F.cross_entropy(net(x.flatten(1)), y), None

    seed_everything(0)
    net = torch.nn.Linear(64, 2)
    h = fit(net, (vols, labels), None, profile="smoke", steps=40, batch_size=16, lr=5e-2, progress=False, step_fn=step)
    assert h["train_loss"][-1] < h["train_loss"][0]
    with pytest.raises(ValueError, match="volumes .* need shift=0"):
        fit(net, (vols, labels), None, profile="smoke", steps=1, step_fn=step, shift=1, progress=False)


def test_unwrap_reaches_the_model_inside_compile_and_ddp_wrappers():
    from vitlab.train import unwrap

    class Wrapper(torch.nn.Module):  # stands in for DDP (.module) and torch.compile (._orig_mod)
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    core = torch.nn.Linear(2, 2)
    assert unwrap(core) is core
    assert unwrap(Wrapper(Wrapper(core, "module"), "_orig_mod")) is core
