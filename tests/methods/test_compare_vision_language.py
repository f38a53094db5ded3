"""Chapter 7's comparison helpers (vitlab.methods.vision_language.compare): the rows trained here share the LLaVA-UHD
fine-tune recipe, start_from copies the base exactly (a fresh LLaVA-SP row reads the base's 64 tokens unchanged after
its spatial tokens), the BUS decoder row's shapes, pruning_accuracy against PrunedVLM, and bad input."""
import pytest
import torch

from vitlab import zoo
from vitlab.methods.vision_language import compare as C
from vitlab.methods.vision_language import hiprune as H
from vitlab.methods.vision_language import llava_uhd_v3 as U
from vitlab.vlm import TinyVLM, VisionProjector, answer_accuracy, caption_scenes


def _base(seed=0):
    torch.manual_seed(seed)
    return U.base_vlm().eval()


def test_rows_and_entries():
    assert C.ROWS == ("p4", "p8", "rpe_wtc", "sp", "pad", "hiprune_21", "hiprune_7", "random_21", "random_7")
    assert set(C.LABELS) == set(C.ROWS)
    assert C.entry_name("p4", 1) == "ch7_uhd_p4_s1" and C.entry_name("rpe_wtc", 0, long=True) == "ch7_uhd_rpe_wtc_long_s0"
    assert C.entry_name("sp", 2) == "ch7_cmp_sp_s2" and C.entry_name("p8", 0, long=True) == "ch7_cmp_p8_long_s0"
    with pytest.raises(ValueError, match="row must be one of"):
        C.entry_name("hiprune_7", 0)
    with pytest.raises(ValueError, match="seed must be one of"):
        C.entry_name("pad", 1, long=True)


def test_trained_rows_share_the_uhd_fine_tune_recipe():
    control = zoo.ZOO[U.entry_name("p4", 1)]
    for name in (C.entry_name("sp", 1), C.entry_name("pad", 1)):
        r = zoo.ZOO[name]
        assert r.model != control.model
        for field in ("data", "data_kwargs", "fit", "seed", "data_seed", "per_profile", "objective",
                      "objective_kwargs", "init", "shares"):
            assert getattr(r, field) == getattr(control, field), field
    long_control, long_uhd = zoo.ZOO[C.entry_name("p4", 0, long=True)], zoo.ZOO[U.entry_name("rpe_wtc", 0, long=True)]
    assert long_control.model == control.model
    for field in ("fit", "per_profile", "objective_kwargs", "init"):
        assert getattr(long_control, field) == getattr(long_uhd, field), field


@pytest.mark.parametrize("row, tokens", [("sp", 70), ("pad", 8)])
def test_start_from_copies_the_base(row, tokens):
    base = _base()
    m = C.compare_vlm(row)
    fresh = {k: v.clone() for k, v in m.state_dict().items()}
    m.start_from(base)
    m.eval()
    for part in ("vision_encoder", "lm"):
        for k, v in getattr(base, part).state_dict().items():
            assert torch.equal(getattr(m, part).state_dict()[k], v)
    for k, v in base.projector.state_dict().items():
        assert torch.equal(m.projector.patch_proj.state_dict()[k], v)
    new = [k for k in fresh if not k.startswith(("vision_encoder.", "lm.", "projector.patch_proj."))]
    assert new and all(torch.equal(m.state_dict()[k], fresh[k]) for k in new)  # the method's own parts stay fresh
    x = torch.rand(2, 3, 32, 32)
    prefix = m.visual_prefix(x)
    assert prefix.shape == (2, tokens, U.LM["dim"])
    if row == "sp":  # spatial tokens first, then the base's 64 projected patch tokens, unchanged
        torch.testing.assert_close(prefix[:, 6:], base.visual_prefix(x))


def test_pad_projector_summarises_any_length():
    p = C.PADProjector(16, 8, num_queries=3, num_heads=2)
    assert p(torch.rand(2, 5, 16)).shape == (2, 3, 8) and p(torch.rand(2, 64, 16)).shape == (2, 3, 8)
    assert isinstance(p.patch_proj, VisionProjector)


def test_pruning_accuracy_equals_pruned_vlm():
    base = _base()
    out = C.pruning_accuracy(base, seed=0, n=24)
    assert set(out) == {f"{m}_{k}_{kind}" for m in C.PRUNE_METHODS for k in C.BUDGETS
                        for kind in C.KINDS + ("all",)}
    data = caption_scenes("test", seed=U.DATA_SEED, n=24)
    for k in C.BUDGETS:  # HiPrune is deterministic: the same answers as the PrunedVLM that runs the ViT itself
        assert out[f"hiprune_{k}_all"] == pytest.approx(
            answer_accuracy(H.PrunedVLM(base, "hiprune", k), data, kinds=C.KINDS))


def test_bad_input():
    with pytest.raises(ValueError, match="row must be one of"):
        C.compare_vlm("cropping")
    with pytest.raises(TypeError, match="base must be a TinyVLM with a VisionProjector"):
        C.compare_vlm("pad").start_from(C.compare_vlm("sp"))
    with pytest.raises(TypeError, match="vlm must be a TinyVLM"):
        C.pruning_accuracy(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="row must be one of"):
        C.row_vlm("dense", 0)
    assert issubclass(C.CompareVLM, TinyVLM)
