"""DuoFormer (author's code xiaoyatang/duoformer_TCGA via AliSerwat/duoformer_TCGA, models/model.py region index
tables, models/multi_vision_transformer.py; CURRICULUM.md #50): region gathering and per-region scale attention."""
import pytest
import torch

from vitlab.methods.architectures import duoformer as D
from vitlab.models import create_model
from model_helpers import assert_rejects_bad_images


def test_region_index_by_hand():
    """A 2x2 coarse grid, factor 2: the fine map is 4x4 (flat indices 0..15); region 0 is the top-left 2x2 block
    (0, 1, 4, 5), region 3 the bottom-right (10, 11, 14, 15)."""
    idx = D.region_index(2, 2)
    assert idx.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    assert sorted(D.region_index(4, 4).reshape(-1).tolist()) == list(range(256)), "every fine cell exactly once"


def test_gather_regions_reads_the_right_cells():
    tokens = torch.arange(16.0).reshape(1, 16, 1)
    out = D.gather_regions(tokens, D.region_index(2, 2))
    assert out[0, 3, :, 0].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_a_region_holds_22_tokens_in_scale_order():
    torch.manual_seed(0)
    model = D.DuoFormer(**{**D.CONFIG}).eval()
    x = torch.nn.functional.pad(torch.rand(2, 1, 28, 28), (2, 2, 2, 2))
    maps = model.cnn(x)
    regions = model.region_tokens(maps)
    assert regions.shape == (2, 16, 22, 56)
    coarse = model.proj[2](maps[2].flatten(2).transpose(1, 2))  # [2, 16, D]
    torch.testing.assert_close(regions[:, 5, 1] - model.scale_embed[0, 0, 1], coarse[:, 5])  # slot 1: coarse cell 5


def test_scale_attention_stays_inside_each_region():
    """The regions are separate sequences of the scale attention: perturbing region 0's tokens leaves region 7's
    output unchanged."""
    torch.manual_seed(1)
    model = D.DuoFormer(**D.CONFIG).eval()
    regions = torch.randn(1, 16, 22, 56)
    blk = model.scale_blocks[0]
    out = blk(regions.reshape(16, 22, 56)).reshape(1, 16, 22, 56)
    moved = regions.clone()
    moved[0, 0] += 1.0
    out2 = blk(moved.reshape(16, 22, 56)).reshape(1, 16, 22, 56)
    torch.testing.assert_close(out2[0, 7], out[0, 7])
    assert not torch.allclose(out2[0, 0], out[0, 0])


def test_models_and_matched_parameters():
    from vitlab.methods.architectures import recipes

    duo, single, vit = (create_model(f"ch1_{m}") for m in ("duoformer", "duoformer_single_scale", "vit"))
    for m in (duo, single):
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        recipes.check_matched(m, vit)
    assert not hasattr(single, "scale_blocks") and len(single.patch_blocks) == 4
    for m in (duo, single):  # no dead parameters: the counts above are what is trained
        m(torch.randn(2, 1, 28, 28)).sum().backward()
        assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("call, match", [
    (lambda: D.DuoFormer(img_size=40), "DuoFormer: img_size=40; this tiny model pads inputs up to 32 px"),
    (lambda: D.DuoFormer()(torch.randn(1, 3, 28, 28)), r"DuoFormer: x is \(3, 28, 28\)"),
    (lambda: D.region_index(0, 2), "region_index: coarse must be"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_bad_images():
    assert_rejects_bad_images(D.DuoFormer(), in_chans=1, img_size=28)
