import pytest

import vitlab
from vitlab.profiles import PROFILES, profile


def test_three_profiles_and_env_selection(monkeypatch):
    assert set(PROFILES) == {"smoke", "cpu", "gpu"}
    monkeypatch.setenv("VITLAB_PROFILE", "cpu")
    assert profile().name == "cpu"
    monkeypatch.setenv("VITLAB_PROFILE", "smoke")
    assert vitlab.profile().name == "smoke"
    assert profile("CPU").name == "cpu"


def test_default_is_cpu_without_cuda(monkeypatch):
    monkeypatch.delenv("VITLAB_PROFILE", raising=False)
    monkeypatch.setattr("vitlab.profiles._cuda", lambda: False)
    assert profile().name == "cpu"


def test_smoke_and_cpu_are_offline_gpu_is_not():
    assert not PROFILES["smoke"].allow_download and not PROFILES["cpu"].allow_download
    assert PROFILES["gpu"].allow_download and PROFILES["gpu"].kernels and PROFILES["gpu"].amp_dtype == "bfloat16"


def test_replace_makes_a_variant():
    p = profile("smoke").replace(epochs=1)
    assert p.epochs == 1 and profile("smoke").epochs == PROFILES["smoke"].epochs != 1


def test_gpu_profile_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr("vitlab.profiles._cuda", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        profile("gpu")


def test_seeding_is_repeatable():
    import torch
    vitlab.seed_everything(3)
    a = torch.rand(3)
    vitlab.seed_everything(3)
    assert torch.equal(a, torch.rand(3))
