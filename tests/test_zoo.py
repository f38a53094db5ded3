"""zoo: trains once, loads with weights_only, never trusts a truncated file, and two racing processes
produce one valid file."""
import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

import vitlab

from vitlab import zoo
import zoo_helpers as zh


@pytest.fixture
def ckpts(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CHECKPOINTS", str(tmp_path))
    return tmp_path


def test_trains_once_then_loads(ckpts, monkeypatch):
    model, info = zoo.get(zh.NAME, "smoke", progress=False, return_info=True)
    path = zh.checkpoint(ckpts)
    assert path.exists() and info["path"] == str(path)
    assert not list(ckpts.glob("*.lock")), "no lock file is left behind"
    assert 0.0 <= info["metrics"]["test_acc"] <= 1.0
    payload = torch.load(path, weights_only=True)  # plain tensors and dicts: loads without pickled code
    assert payload["sha256"] == zoo.state_hash(model.state_dict())

    monkeypatch.setattr(zoo, "_train", lambda *a, **k: pytest.fail("retrained a valid checkpoint"))
    again = zoo.get(zh.NAME, "smoke")
    assert zoo.state_hash(again.state_dict()) == payload["sha256"]
    assert not again.training


def test_truncated_checkpoint_is_detected_and_retrained(ckpts):
    zoo.get(zh.NAME, "smoke", progress=False)
    path = zh.checkpoint(ckpts)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        model = zoo.get(zh.NAME, "smoke", progress=False)
    assert zoo.load_checkpoint(path)["sha256"] == zoo.state_hash(model.state_dict())


def test_tampered_weights_fail_the_hash(ckpts):
    zoo.get(zh.NAME, "smoke", progress=False)
    path = zh.checkpoint(ckpts)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"] += 1.0
    torch.save(payload, path)
    with pytest.raises(ValueError, match="SHA-256"):
        zoo.load_checkpoint(path)
    with pytest.warns(UserWarning, match="unreadable"):
        zoo.get(zh.NAME, "smoke", progress=False)


def test_checkpoint_from_another_recipe_is_retrained(ckpts):
    zoo.get(zh.NAME, "smoke", progress=False)
    path = zh.checkpoint(ckpts)
    payload = torch.load(path, weights_only=True)
    payload["config"]["fit"]["epochs"] = 99
    zoo.save_checkpoint(path, payload)
    with pytest.warns(UserWarning, match="another recipe"):
        zoo.get(zh.NAME, "smoke", progress=False)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.pt"

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        zoo.save_checkpoint(target, {"bad": Boom()})
    assert not target.exists() and not list(tmp_path.glob("*.tmp"))


def test_two_processes_at_once_train_once_and_agree(tmp_path):
    log = tmp_path / "trainings.log"
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        hashes = pool.starmap(zh.get_in_child, [(str(tmp_path), str(log))] * 2)
    assert hashes[0] == hashes[1]
    assert len(log.read_text().split()) == 1  # the second process waited on the lock and loaded the file
    assert zoo.load_checkpoint(zh.checkpoint(tmp_path))["sha256"] == hashes[0]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="vit_tiny_mnist5k"):
        zoo.get("no_such_model")


def test_metrics_record_train_val_test_and_the_plateau(ckpts):
    _, info = zoo.get(zh.NAME, "smoke", progress=False, return_info=True)
    m = info["metrics"]
    assert {"train_acc", "val_acc", "test_acc", "plateau_gain"} <= set(m)
    assert all(0.0 <= m[k] <= 1.0 for k in ("train_acc", "val_acc", "test_acc"))
    assert len(info["history"]["val_acc"]) == info["config"]["fit"]["epochs"]


def test_plateau_gain_by_hand():
    # best of the last quarter (0.80) minus the best before it (0.79): still rising by a point
    assert zoo.plateau_gain([0.5, 0.7, 0.75, 0.79, 0.78, 0.79, 0.78, 0.80]) == pytest.approx(0.01)
    assert zoo.plateau_gain([0.5, 0.9, 0.9, 0.89]) == pytest.approx(-0.01)  # flat: more epochs would not help


def test_a_profile_can_share_another_profiles_checkpoint(ckpts):
    name = "test_vit_digits8_shared"
    if name not in zoo.ZOO:
        zoo.register(name, zoo.Recipe(model="vit_nano", data="digits8", train_kwargs={},
                                      fit=dict(epochs=1, lr=1e-3, batch_size=64), shares={"smoke": "cpu"}))
    assert zoo.path_for(name, "smoke") == zoo.path_for(name, "cpu") == ckpts / f"{name}-cpu.pt"
    smoke_model, info = zoo.get(name, "smoke", progress=False, return_info=True)
    assert info["config"]["profile"] == "cpu" and not (ckpts / f"{name}-smoke.pt").exists()
    assert zoo.state_hash(zoo.get(name, "cpu").state_dict()) == zoo.state_hash(smoke_model.state_dict())


def test_train_kwargs_reach_the_train_split_only(monkeypatch):
    seen = {}
    from vitlab import data as vdata

    real = vdata.load

    def spy(name, split, profile=None, **kw):
        seen[split] = kw
        return real(name, split, profile, **kw)

    monkeypatch.setattr(vdata, "load", spy)
    recipe = zoo.Recipe(model="vit_nano", data="cluttered_scenes", data_kwargs=dict(img_size=32),
                        train_kwargs=dict(n=300), fit=dict(epochs=1, batch_size=100))
    payload = zoo._train("t", recipe, vitlab.profile("smoke"), progress=False)
    assert seen["train"]["n"] == 300 and "n" not in seen["val"] and "n" not in seen["test"]
    assert payload["config"]["train_kwargs"] == {"n": 300}


# ------------------------------------------------------------------------------------------ faults
def _warnings_from(call):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in caught if "zoo:" in str(w.message)]


def _valid_after(ckpts, model):
    assert zoo.load_checkpoint(zh.checkpoint(ckpts))["sha256"] == zoo.state_hash(model.state_dict())


@pytest.mark.parametrize("damage", ["garbage", "flipped byte", "empty"])
def test_damaged_files_warn_once_and_are_retrained(ckpts, damage):
    zoo.get(zh.NAME, "smoke", progress=False)
    path = zh.checkpoint(ckpts)
    raw = bytearray(path.read_bytes())
    if damage == "garbage":
        raw = bytearray(b"not a checkpoint at all" * 10)
    elif damage == "flipped byte":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    model, said = _warnings_from(lambda: zoo.get(zh.NAME, "smoke", progress=False))
    assert len(said) == 1 and "retraining" in said[0], said  # one warning, not one per check
    _valid_after(ckpts, model)


def test_weights_that_do_not_fit_are_retrained_even_with_a_consistent_hash(ckpts):
    zoo.get(zh.NAME, "smoke", progress=False)
    path = zh.checkpoint(ckpts)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.extra"] = payload["state_dict"].pop("head.bias")  # renamed key, hash recomputed
    payload["sha256"] = zoo.state_hash(payload["state_dict"])
    zoo.save_checkpoint(path, payload)
    model, said = _warnings_from(lambda: zoo.get(zh.NAME, "smoke", progress=False))
    assert len(said) == 1 and "do not fit" in said[0]
    _valid_after(ckpts, model)


def test_a_registry_change_is_not_served_from_a_stale_checkpoint(ckpts, monkeypatch):
    from vitlab.models import registry

    old = zoo.get(zh.NAME, "smoke", progress=False)
    assert len(old.blocks) == 4
    monkeypatch.setitem(registry.MODELS, "vit_nano", {**registry.MODELS["vit_nano"], "depth": 2})
    model, said = _warnings_from(lambda: zoo.get(zh.NAME, "smoke", progress=False))
    assert len(model.blocks) == 2 and len(said) == 1 and "another architecture" in said[0]


def test_a_checkpoint_of_another_profile_is_not_trusted(ckpts):
    zoo.get(zh.NAME, "smoke", progress=False)
    path = zh.checkpoint(ckpts)
    payload = torch.load(path, weights_only=True)
    payload["config"]["profile"] = "cpu"
    zoo.save_checkpoint(path, payload)
    _, said = _warnings_from(lambda: zoo.get(zh.NAME, "smoke", progress=False))
    assert len(said) == 1 and "another recipe" in said[0]


def test_a_directory_in_the_way_fails_before_any_training(ckpts, monkeypatch):
    zh.checkpoint(ckpts).mkdir()
    monkeypatch.setattr(zoo, "_train", lambda *a, **k: pytest.fail("trained before failing"))
    with pytest.raises(ValueError, match="is a directory"):
        zoo.get(zh.NAME, "smoke", progress=False)


@pytest.mark.parametrize("leftover_lock", [False, True])
def test_a_read_only_folder_trains_uncached_and_says_so_first(ckpts, monkeypatch, leftover_lock):
    if leftover_lock:
        (ckpts / f"{zh.NAME}-smoke.pt.lock").write_text("")
    monkeypatch.setattr(zoo, "_writable", lambda folder: False)
    model, said = _warnings_from(lambda: zoo.get(zh.NAME, "smoke", progress=False))
    assert len(said) == 1 and "cannot write" in said[0] and not zh.checkpoint(ckpts).exists()
    assert not model.training and model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_a_waiting_caller_is_told_who_holds_the_lock(ckpts):
    import subprocess
    import sys
    import time

    lock = f"{zh.checkpoint(ckpts)}.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(4)",
                               lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        _, said = _warnings_from(lambda: zoo.get(zh.NAME, "smoke", progress=False))
        assert any("another process is training" in s and lock in s for s in said), said
        assert time.perf_counter() - t0 > 1  # it waited for the holder
    finally:
        holder.kill()


def test_a_trainer_killed_mid_training_leaves_nothing_half_written(ckpts):
    import subprocess
    import sys
    import time

    code = ("import os, sys, time; os.environ['VITLAB_CHECKPOINTS'] = sys.argv[1]; sys.path.insert(0, 'tests'); "
            "import zoo_helpers as zh; from vitlab import zoo; "
            "zoo._train = lambda *a, **k: (print('training', flush=True), time.sleep(60)); "
            "zoo.get(zh.NAME, 'smoke', progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ckpts)], stdout=subprocess.PIPE, text=True,
                             cwd=str(Path(zoo.__file__).parents[1]))
    assert child.stdout.readline().strip() == "training"
    child.kill()
    child.wait()
    assert not zh.checkpoint(ckpts).exists() and not list(ckpts.glob("*.tmp"))
    t0 = time.perf_counter()
    model = zoo.get(zh.NAME, "smoke", progress=False)  # the dead trainer's lock is gone with it
    assert time.perf_counter() - t0 < 30
    _valid_after(ckpts, model)


# ------------------------------------------------------------------------------------------ fine-tunes (init=)
FT = "test_vit_digits8_ft"
if FT not in zoo.ZOO:
    zoo.register(FT, zoo.Recipe(model="vit_nano", data="digits8", init=zh.NAME,
                                fit=dict(steps=2, lr=1e-4, shift=0, batch_size=64, seed=3)))


def _get_after_the_base_changes(ckpts, name):
    """zoo.get(name) after the test base is retrained under another recipe (then the base's recipe is restored)."""
    zh.checkpoint(ckpts).unlink()
    zoo.ZOO[zh.NAME] = zoo.Recipe(model="vit_nano", data="digits8", fit=dict(epochs=1, lr=2e-3, shift=0, batch_size=64))
    try:
        zoo.get(name, "smoke", progress=False)
    finally:
        zoo.ZOO[zh.NAME] = zoo.Recipe(model="vit_nano", data="digits8",
                                      fit=dict(epochs=1, lr=1e-3, shift=0, batch_size=64))


def test_finetune_starts_from_its_base_and_follows_it(ckpts):
    base = zoo.get(zh.NAME, "smoke", progress=False)
    tuned, info = zoo.get(FT, "smoke", progress=False, return_info=True)
    assert info["config"]["init"] == {"name": zh.NAME, "sha256": zoo.state_hash(base.state_dict())}
    # two small steps from the base: close to it, not a fresh random init
    moved = max((a - b).abs().max().item() for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
    assert 0 < moved < 0.01
    with pytest.warns(UserWarning, match="another recipe"):  # a different base: the fine-tune is not trusted
        _get_after_the_base_changes(ckpts, FT)


USER = "test_uses_digits8"
if USER not in zoo.ZOO:
    zoo.register(USER, zoo.Recipe(model="vit_nano", data="digits8", uses=(zh.NAME,),
                                  fit=dict(steps=1, lr=1e-4, shift=0, batch_size=64)))


def test_an_entry_that_uses_another_retrains_with_it(ckpts):
    base = zoo.get(zh.NAME, "smoke", progress=False)
    _, info = zoo.get(USER, "smoke", progress=False, return_info=True)
    assert info["config"]["uses"] == {zh.NAME: zoo.state_hash(base.state_dict())}
    with pytest.warns(UserWarning, match="another recipe"):  # the entry it reads changed: not trusted
        _get_after_the_base_changes(ckpts, USER)
    with pytest.raises(ValueError, match="must be a tuple of registered entries"):
        zoo.register("t_bad_uses", zoo.Recipe(model="vit_nano", data="digits8", uses=("no_such_entry",)))
    with pytest.raises(ValueError, match="must be a tuple of registered entries"):
        zoo.register("t_bad_uses", zoo.Recipe(model="vit_nano", data="digits8", uses=zh.NAME))


def test_register_rejects_an_unknown_or_mismatched_init():
    with pytest.raises(ValueError, match="'no_such_base', which must be a registered entry"):
        zoo.register("t_bad_init", zoo.Recipe(model="vit_tiny", data="digits8", init="no_such_base"))
    with pytest.raises(ValueError, match="must be a registered 'vit_tiny' entry"):
        zoo.register("t_bad_init", zoo.Recipe(model="vit_tiny", data="digits8", init=zh.NAME))  # a vit_nano base


def test_a_model_that_extends_the_base_config_may_start_from_it():
    """A model registered as the base's config plus arguments that hold no weights (an attention temperature)
    fine-tunes from the base: the registration accepts it and the strict load at training time checks the rest."""
    from vitlab.models import registry
    from vitlab.models.vit import VisionTransformer as ViT

    def hotter(temperature=1.0, **kw):
        return ViT(**kw)

    registry.register_model("t_vit_nano_hot", hotter, temperature=2.0, **registry.MODELS["vit_nano"])
    try:
        zoo.register("t_hot_init", zoo.Recipe(model="t_vit_nano_hot", data="digits8", init=zh.NAME))
        assert zoo.ZOO["t_hot_init"].init == zh.NAME
    finally:
        zoo.ZOO.pop("t_hot_init", None)
        registry.MODELS.pop("t_vit_nano_hot", None)
        registry._BUILDERS.pop("t_vit_nano_hot", None)


def test_state_hash_covers_batchnorm_counters_and_keeps_old_hashes():
    """A 0-dim tensor (BatchNorm's num_batches_tracked) hashes, and changes the hash when it changes; the hash of a
    committed checkpoint without one is what it was when it was written."""
    import torch

    bn = torch.nn.BatchNorm2d(3)
    before = zoo.state_hash(bn.state_dict())
    bn.num_batches_tracked += 1
    assert zoo.state_hash(bn.state_dict()) != before
    payload = zoo.load_checkpoint(zoo.checkpoint_dir() / "vit_tiny_mnist5k-cpu.pt")
    assert zoo.state_hash(payload["state_dict"]) == payload["sha256"]


# A pre-training (MAE, through its zoo objective) and a fine-tune that starts from its encoder; a multi-label entry.
# Registered for these tests only (the CLI's choices must not see them).
from vitlab.mae import MaskedAutoencoder, mae_model  # noqa: E402  (registers the "mae" objective)
from vitlab.models import VisionTransformer  # noqa: E402
from vitlab.models import registry  # noqa: E402

TINY = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2)


@pytest.fixture
def pretraining(ckpts, monkeypatch):
    for name, build, cfg in (("t_mae", mae_model, dict(TINY, decoder_dim=16, decoder_depth=1, decoder_heads=2)),
                             ("t_mae_vit", VisionTransformer, dict(TINY, num_classes=10, global_pool="avg"))):
        monkeypatch.setitem(registry.MODELS, name, cfg)
        monkeypatch.setitem(registry._BUILDERS, name, build)
    for name, recipe in (
            ("t_mae_digits8", zoo.Recipe(model="t_mae", data="digits8", fit=dict(steps=4, lr=1e-3, batch_size=32),
                                         objective="mae", objective_kwargs=dict(mask_ratio=0.75, crop_scale=[0.5, 1.0]))),
            ("t_mae_ft_digits8", zoo.Recipe(model="t_mae_vit", data="digits8", init="t_mae_digits8",
                                            fit=dict(steps=1, lr=1e-9, batch_size=32, layer_decay=0.75))),
            ("t_thorax16", zoo.Recipe(model="t_mae_vit", data="thorax_xrays", data_kwargs=dict(img_size=16),
                                      fit=dict(steps=4, lr=1e-3, batch_size=32, label_smoothing=0.0),
                                      per_profile={"smoke": dict(max_train=200)}))):
        monkeypatch.setitem(zoo.ZOO, name, recipe)  # removed again after the test
        del zoo.ZOO[name]
        zoo.register(name, recipe)  # through register's checks
    return ckpts


def test_a_pretraining_objective_trains_and_scores_itself(pretraining):
    mae, info = zoo.get("t_mae_digits8", "smoke", progress=False, return_info=True)
    assert isinstance(mae, MaskedAutoencoder) and not mae.training
    assert info["config"]["objective"] == {"name": "mae", "mask_ratio": 0.75, "crop_scale": [0.5, 1.0]}
    assert set(info["metrics"]) == {"val_loss", "test_loss", "train_seconds"} and info["metrics"]["test_loss"] > 0
    assert len(info["history"]["step"]) and info["history"]["step"][-1] == 4


def test_a_finetune_starts_from_the_pretrainings_encoder(pretraining):
    mae = zoo.get("t_mae_digits8", "smoke", progress=False)
    vit, info = zoo.get("t_mae_ft_digits8", "smoke", progress=False, return_info=True)
    assert isinstance(vit, VisionTransformer) and info["config"]["init"]["name"] == "t_mae_digits8"
    enc = mae.encoder_state()
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):  # one step at lr 1e-9: still the encoder's
        assert torch.allclose(vit.state_dict()[key], enc[key], atol=1e-6)


def test_a_multilabel_entry_records_mean_auc(pretraining):
    _, info = zoo.get("t_thorax16", "smoke", progress=False, return_info=True)
    m = info["metrics"]
    assert {"val_auc", "test_auc", "test_acc", "plateau_gain"} <= set(m) and 0 <= m["test_auc"] <= 1
    assert len(info["history"]["val_auc"]) == len(info["history"]["epoch"])


def test_a_classifying_objective_records_the_val_curve_and_plateau(pretraining, monkeypatch):
    """A classifier trained with another loss (here: cross-entropy plus a weight penalty) is scored on val every
    epoch: its entry stores the classification metrics, plateau_gain included, and the objective's own."""
    import torch.nn.functional as F

    def objective(weight=0.1):
        def step_fn(net, x, y):
            logits = net(x)
            return F.cross_entropy(logits, y) + weight * net.head.weight.pow(2).sum(), logits

        return zoo.Objective(step_fn=step_fn, metrics=lambda model, train, val, test: {"head_norm": 1.0},
                             classifies=True)

    monkeypatch.setitem(zoo.OBJECTIVES, "t_penalised", objective)
    monkeypatch.setitem(zoo.ZOO, "t_penalised_digits8", zoo.Recipe(
        model="t_mae_vit", data="digits8", fit=dict(steps=4, lr=1e-3, batch_size=32), objective="t_penalised"))
    _, info = zoo.get("t_penalised_digits8", "smoke", progress=False, return_info=True)
    assert {"train_acc", "val_acc", "test_acc", "plateau_gain", "head_norm", "train_seconds"} == set(info["metrics"])
    assert len(info["history"]["val_acc"]) == len(info["history"]["epoch"])


def test_an_unregistered_objective_is_named(pretraining, monkeypatch):
    monkeypatch.setitem(zoo.ZOO, "t_nobj", zoo.Recipe(model="t_mae", data="digits8", fit=dict(steps=1),
                                                       objective="nope"))
    with pytest.raises(ValueError, match="needs the objective 'nope', which is not registered"):
        zoo.get("t_nobj", "smoke", progress=False)


def test_measured_is_computed_once_per_checkpoint(ckpts):
    calls = []

    def fn(model, profile):
        calls.append(profile.name)
        return {"n_params": sum(p.numel() for p in model.parameters())}

    first = zoo.measured(zh.NAME, "size", fn, "smoke")
    assert zoo.measured(zh.NAME, "size", fn, "smoke") == first and calls == ["smoke"]  # read from the cache
    cache = zh.checkpoint(ckpts).with_suffix(".size.json")
    assert cache.exists() and json.loads(cache.read_text())["values"] == first
    cache.write_text(cache.read_text().replace(zoo.get(zh.NAME, "smoke", return_info=True, progress=False)[1]
                                               ["sha256"], "0" * 64))  # as if the checkpoint were retrained
    assert zoo.measured(zh.NAME, "size", fn, "smoke") == first and len(calls) == 2
    with pytest.raises(ValueError, match="key"):
        zoo.measured(zh.NAME, "../x", fn, "smoke")
    with pytest.raises(TypeError, match="fn"):
        zoo.measured(zh.NAME, "size", 3, "smoke")
    with pytest.raises(TypeError, match="dict"):
        zoo.measured(zh.NAME, "other", lambda m, p: 1.0, "smoke")
