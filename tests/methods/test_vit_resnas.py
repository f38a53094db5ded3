"""ViT-ResNAS (official yilunliao/vit-search, nets/vit_sr_supernet.py SpatialReductionPatchEmbedding, channel
masks of nets/channel_drop.py, evo_search.py; CURRICULUM.md #26): hand-checked cases."""
import random

import pytest
import torch

from vitlab.methods.architectures import vit_resnas as R
from model_helpers import assert_rejects_bad_images


def test_residual_path_is_the_zero_padded_average_pool():
    """With the main path zeroed (conv, CLS projection, new position embedding), the reduction is exactly the
    residual: CLS as it is and 2x2-averaged patches, zero-padded from C_in to C_out channels."""
    sr = R.SpatialReduction(grid=2, c_in=2, c_out=3, stride=2)
    with torch.no_grad():
        for p in (sr.reduce.weight, sr.reduce.bias, sr.token.weight, sr.token.bias, sr.pos_embed):
            p.zero_()
    x = torch.tensor([[[9.0, 8.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])  # CLS + 2x2 patches
    want = torch.tensor([[[9.0, 8.0, 0.0], [4.0, 5.0, 0.0]]])  # patches averaged: (1+3+5+7)/4, (2+4+6+8)/4
    torch.testing.assert_close(sr(x), want)
    plain = R.SpatialReduction(grid=2, c_in=2, c_out=3, stride=2, residual=False)
    plain.load_state_dict(sr.state_dict())
    torch.testing.assert_close(plain(x), torch.zeros(1, 2, 3))


def test_reduction_shapes_and_the_conv_geometry():
    sr = R.SpatialReduction(grid=14, c_in=32, c_out=64, stride=2)
    assert sr(torch.randn(2, 1 + 196, 32)).shape == (2, 1 + 49, 64)
    assert sr.reduce.kernel_size == (3, 3) and sr.reduce.stride == (2, 2) and sr.reduce.padding == (1, 1)


def test_masked_block_keeps_the_first_units_and_can_be_skipped():
    torch.manual_seed(0)
    blk = R.MaskedBlock(8, 2, 6)
    x = torch.randn(2, 5, 8)
    blk.set_subnet(2, 6, keep=False)
    torch.testing.assert_close(blk(x), x)
    blk.set_subnet(2, 1)  # one MLP unit: the MLP adds fc2[:, 0] * gelu(fc1[0] . LN(x)) + fc2.bias
    after_attn = x + blk.proj(torch.nn.functional.scaled_dot_product_attention(
        *blk.qkv(blk.norm1(x)).reshape(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)).transpose(1, 2).reshape(2, 5, 8))
    h = torch.nn.functional.gelu(blk.fc1(blk.norm2(after_attn)))[..., :1]
    want = after_attn + h @ blk.fc2.weight[:, :1].T + blk.fc2.bias
    torch.testing.assert_close(blk(x), want)


def test_the_largest_subnet_is_the_whole_network():
    torch.manual_seed(1)
    model = R.ResNASViT(**{**R.CONFIG, "depths": (1, 2)})
    x = torch.randn(2, 1, 28, 28)
    full = model(x)
    sub = model.sample_subnet(random.Random(0), widths=(0.5,), skip_prob=0.0)
    masked = model.set_subnet(sub)(x)
    assert not torch.allclose(masked, full)
    torch.testing.assert_close(model.set_subnet(None)(x), full)


def test_a_masked_block_is_exactly_the_smaller_block():
    """Keeping the first head of two and 3 MLP units of 6 computes what a block of one head and 3 units built from
    the first rows/columns of the weights computes: the masks are the channel masks of the official supernet."""
    torch.manual_seed(2)
    big = R.MaskedBlock(8, 2, 6)
    big.set_subnet(1, 3)
    x = torch.randn(2, 5, 8)
    q, k, v = big.qkv(big.norm1(x)).reshape(2, 5, 3, 2, 4)[:, :, :, 0].unbind(2)  # the kept head: [B, N, 4]
    head = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    after_attn = x + head @ big.proj.weight[:, :4].T + big.proj.bias
    hidden = torch.nn.functional.gelu(big.norm2(after_attn) @ big.fc1.weight[:3].T + big.fc1.bias[:3])
    torch.testing.assert_close(big(x), after_attn + hidden @ big.fc2.weight[:, :3].T + big.fc2.bias)


def test_supernet_samples_a_subnet_per_training_step_and_evaluates_the_one_set():
    torch.manual_seed(3)
    model = R.ResNASViT(**R.CONFIG, supernet=True)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    full = model(x)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), a)  # the sample comes from torch's seeded generator: reproducible
    outs = {tuple(model(x).flatten().tolist()) for _ in range(6)}
    assert len(outs) > 1  # different sub-networks on different steps
    assert model.subnet == model.largest()  # training never leaves a sampled sub-network set
    model.eval()
    torch.testing.assert_close(model(x), full)


def test_a_fixed_subnet_model_runs_that_subnet():
    torch.manual_seed(4)
    subnet = R.PROBES["small"]
    fixed = R.ResNASViT(**R.CONFIG, subnet=subnet)
    whole = R.ResNASViT(**R.CONFIG)
    whole.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fixed(x), whole.set_subnet(R.Subnet(subnet))(x))
    assert fixed.train()(x).shape == (2, 10)  # a fixed sub-network does not sample in training


def test_the_space_is_every_sample_with_one_spelling_per_architecture():
    model = R.ResNASViT(**R.CONFIG)
    space = model.all_subnets()
    # stage 1: MLP 32 or 64; stage 2: 4 widths per block, and skip for all but the first
    assert len(space) == 2 * 4 * 5 * 5 == len(set(space))
    rng = random.Random(0)
    assert {model.sample_subnet(rng) for _ in range(2000)} == set(space)
    assert all(model.set_subnet(R.Subnet(p)) for p in R.PROBES.values())
    assert {R.Subnet(p) for p in R.PROBES.values()} <= set(space)


def test_subnet_macs_by_hand():
    """One block of width 8, 2 heads of 4, MLP 6 units, on N = 5 tokens: qkv + proj 5*8*24 + 5*8*8 = 1280,
    attention 2*25*h*4, MLP 2*5*8*m."""
    model = R.ResNASViT(img_size=4, patch_size=2, dims=(8, 16), depths=(1, 1), num_heads=(2, 2), mlp_ratio=0.75)
    s = R.Subnet(((1, 3, True), (1, 1, False)))
    assert R.subnet_macs(model, s) == 1280 + 2 * 25 * 1 * 4 + 2 * 5 * 8 * 3


def test_evolution_respects_the_budget_and_finds_the_best():
    model = R.ResNASViT(**R.CONFIG)
    limit = int(0.8 * R.subnet_macs(model, model.largest()))
    fitness = lambda s: R.subnet_macs(model, s)  # noqa: E731 - "bigger is better": the best is near the limit
    ranked = R.evolve(fitness, model, max_macs=limit, population=6, generations=3, seed=0)
    assert all(R.subnet_macs(model, s) <= limit for _, s in ranked)
    assert [f for f, _ in ranked] == sorted((f for f, _ in ranked), reverse=True)
    assert len(ranked) == 6 + 3 * 3  # the first population, then 3 new children a generation: never one twice
    assert ranked == R.evolve(fitness, model, max_macs=limit, population=6, generations=3, seed=0)


@pytest.mark.parametrize("call, match", [
    (lambda: R.SpatialReduction(7, 8, 16, 2), "SpatialReduction: stride=2 must divide the token grid 7"),
    (lambda: R.SpatialReduction(4, 16, 8), "SpatialReduction: c_out=8 must be >= c_in=16"),
    (lambda: R.SpatialReduction(2, 2, 3)(torch.randn(1, 4, 2)), r"SpatialReduction: tokens \[1, 4, 2\]"),
    (lambda: R.MaskedBlock(8, 2, 6).set_subnet(3, 6), "MaskedBlock.set_subnet: heads must be in"),
    (lambda: R.ResNASViT(patch_size=3), "ResNASViT: patch_size=3 does not divide img_size=28"),
    (lambda: R.ResNASViT()(torch.randn(1, 3, 28, 28)), r"ResNASViT: x is \(3, 28, 28\)"),
    (lambda: R.ResNASViT().set_subnet(R.Subnet(((1, 1, True),))), "ResNASViT.set_subnet: 1 block settings"),
    (lambda: R.ResNASViT().set_subnet(((1, 1, True),)), "ResNASViT.set_subnet: expected a Subnet or None"),
    (lambda: R.ResNASViT(supernet=True, subnet=R.PROBES["small"]), "ResNASViT: give supernet=True or a fixed"),
    (lambda: R.evolve(lambda s: 0, R.ResNASViT(), max_macs=1), "evolve: no sub-network found within"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_bad_images():
    assert_rejects_bad_images(R.ResNASViT(), in_chans=1, img_size=28)
