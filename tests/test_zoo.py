"""zoo: trains once, loads with weights_only, never trusts a truncated file, and two racing processes
produce one valid file."""
import multiprocessing as mp

import pytest
import torch

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
