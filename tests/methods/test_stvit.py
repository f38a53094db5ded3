"""STViT: max-pool initialisation, the semantic cross-attention block, recovery, cost and the comparison entry."""
from types import SimpleNamespace

import pytest
import torch

from vitlab import measure
from vitlab.methods.efficient import stvit
from vitlab.methods.efficient.recipes import Reduced
from vitlab.methods.efficient.stvit import (RecoveryBlock, SemanticBlock, STViTR, analytic_flops, cross_from_block,
                                            semantic_pool, semantic_vit, step_batches)
from vitlab.models import VisionTransformer
from vitlab.models.layers import CrossAttention


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    return VisionTransformer(**(args | kw)).eval()


def test_max_pool_init_on_a_hand_grid():
    # an 8x8 grid holding 0..63 row-major; adaptive max-pool to 3x3 uses the bins rows/cols [0,3), [2,6), [5,8)
    # (they overlap), so each semantic token is the bin's bottom-right value 8*r + c with r, c in (2, 5, 7)
    grid = torch.arange(64.0).view(1, 64, 1)
    tokens = torch.cat([grid, -grid], dim=-1)  # a second channel whose max is the bin's top-left value
    s = semantic_pool(tokens, (8, 8), 3)
    assert s.shape == (1, 9, 2)
    assert s[0, :, 0].tolist() == [18, 21, 23, 42, 45, 47, 58, 61, 63]
    assert (-s[0, :, 1]).tolist() == [0, 2, 5, 16, 18, 21, 40, 42, 45]
    assert torch.equal(semantic_pool(tokens, (8, 8), 8), tokens)  # pool = grid: every token is its own bin


def test_layer_scale_zero_returns_the_pooled_tokens():
    blk = SemanticBlock(32, 2, (4, 4), pool=2, mlp_ratio=2.0, num_prefix=1, layer_scale_init=0.0)
    x = torch.randn(3, 17, 32)
    expected = torch.cat([x[:, :1], semantic_pool(x[:, 1:], (4, 4), 2)], dim=1)
    assert torch.equal(blk(x), expected)
    no_shortcut = SemanticBlock(32, 2, (4, 4), pool=2, mlp_ratio=2.0, layer_scale_init=0.0, shortcut=False)
    assert torch.equal(no_shortcut(x), torch.zeros(3, 5, 32))  # the official default: S = γ·attn (from scratch)
    rec = RecoveryBlock(32, 2, 2.0, layer_scale_init=0.0)
    image = torch.randn(3, 16, 32)
    assert torch.equal(rec(image, torch.randn(3, 4, 32)), image)


def test_shapes_with_fewer_queries_than_keys():
    attn = CrossAttention(32, 2)
    assert attn(torch.randn(2, 10, 32), torch.randn(2, 74, 32)).shape == (2, 10, 32)
    blk = SemanticBlock(32, 2, (8, 8), pool=3, num_prefix=1)
    blk.record_attn = True
    assert blk(torch.randn(2, 65, 32)).shape == (2, 10, 32)  # CLS + 9 semantic tokens
    assert blk.last_attn.shape == (2, 2, 10, 74)  # queries [CLS ; S] over keys [CLS ; S ; 64 image tokens]
    assert torch.allclose(blk.last_attn.sum(-1), torch.ones(2, 2, 10), atol=1e-5)
    assert RecoveryBlock(32, 2)(torch.randn(2, 64, 32), torch.randn(2, 9, 32)).shape == (2, 64, 32)


def test_semantic_block_from_base_equals_the_base_block_when_nothing_is_pooled():
    # pool = grid and no CLS: the semantic tokens are the image tokens, the keys hold every token twice (which
    # leaves softmax attention unchanged) and LayerScale 1 is the base's identity: the block is the base block
    base = tiny(class_token=False, global_pool="avg")
    model = semantic_vit(base, at=1, pool=4, layer_scale_init=1.0)
    x = base.embed(torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        assert torch.allclose(model.blocks[1](x), base.blocks[1](x), atol=1e-5)
        assert torch.allclose(model(torch.ones(1, 3, 16, 16)), base(torch.ones(1, 3, 16, 16)), atol=1e-5)


def test_semantic_vit_leaves_base_alone_and_counts_its_cost():
    base = tiny(depth=3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = semantic_vit(base, at=1, pool=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.blocks[1], SemanticBlock) and not isinstance(base.blocks[1], SemanticBlock)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    x = torch.randn(4, 3, 16, 16)
    for m in (base, model):  # the formula matches torch's flop counter exactly (matmuls, attention, conv)
        assert analytic_flops(m)["total"] == measure.flops(m, x)
    assert analytic_flops(model)["tokens"] == [17, 5, 5]
    assert analytic_flops(base)["tokens"] == [17, 17, 17]


def test_cross_from_block_splits_qkv():
    base = tiny()
    blk = cross_from_block(RecoveryBlock(32, 2, 4.0), base.blocks[0])
    w = base.blocks[0].attn.qkv.weight
    assert torch.equal(blk.attn.q.weight, w[:32]) and torch.equal(blk.attn.kv.weight, w[32:])
    with pytest.raises(ValueError, match="does not match"):
        cross_from_block(RecoveryBlock(32, 2, 2.0), base.blocks[0])


def test_recovery_restores_the_input_grid():
    base = tiny()
    rec = STViTR(semantic_vit(base, at=1, pool=2))
    logits, masks = rec(torch.randn(3, 3, 16, 16))
    assert logits.shape == (3, 4) and masks.shape == (3, 16)  # one mask logit per patch of the 4x4 grid
    image, final = rec.tokens(torch.randn(3, 3, 16, 16))
    assert image.shape == (3, 16, 32) and final.shape == (3, 5, 32)
    assert rec.recovery(image, final[:, 1:]).shape == image.shape


def test_train_recovery_trains_only_the_recovery_and_scores_masks():
    base = tiny()
    rec = STViTR(semantic_vit(base, at=1, pool=2))
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(32, 16, 16)
    masks[:, 4:8, 4:12] = 1  # the same two patches hold the "digit" in every image
    data = SimpleNamespace(images=torch.randn(32, 3, 16, 16, generator=g), labels=torch.zeros(32, dtype=torch.long),
                           masks=masks)
    sem_before = {k: v.clone() for k, v in rec.sem.state_dict().items()}
    losses = stvit.train_recovery(rec, data, 150, lr=1e-2, batch_size=16)
    assert all(torch.equal(v, rec.sem.state_dict()[k]) for k, v in sem_before.items())
    assert losses[-1] < losses[0]
    out = stvit.mask_accuracy(rec, data)
    assert out["background_rate"] == pytest.approx(14 / 16)
    assert out["accuracy"] > 0.95 and out["iou"] > 0.8  # a fixed-position mask is learnt from the positions alone


def test_step_batches_give_exact_steps():
    data = SimpleNamespace(images=torch.randn(10, 3, 16, 16), labels=torch.arange(10))
    images, labels = step_batches(data, 7, 4, seed=1)
    assert images.shape[0] == labels.shape[0] == 28
    assert torch.bincount(labels, minlength=10).max() <= 3  # whole permutations end to end: each image 2 or 3 times


def test_bad_inputs():
    base = tiny()
    with pytest.raises(ValueError, match="tokens hold 15"):
        semantic_pool(torch.randn(1, 15, 4), (4, 4), 2)
    with pytest.raises(ValueError, match="larger than"):
        semantic_pool(torch.randn(1, 16, 4), (4, 4), 5)
    with pytest.raises(TypeError, match="pool"):
        semantic_pool(torch.randn(1, 16, 4), (4, 4), 2.0)
    with pytest.raises(ValueError, match="at=2"):
        semantic_vit(base, at=2)
    with pytest.raises(TypeError, match="at must be an int"):
        semantic_vit(base, at=True)
    with pytest.raises(ValueError, match="pool=5"):
        semantic_vit(base, at=1, pool=5)
    with pytest.raises(ValueError, match="layer_scale_init"):
        semantic_vit(base, at=1, layer_scale_init=-1.0)
    with pytest.raises(TypeError, match="VisionTransformer"):
        semantic_vit(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="semantic_vit"):
        STViTR(base)
    with pytest.raises(ValueError, match=r"\[B, 1 \+ 4\*4"):
        semantic_vit(base, at=1, pool=2).blocks[1](torch.randn(1, 10, 32))
    with pytest.raises(TypeError, match="shortcut"):
        SemanticBlock(32, 2, (4, 4), shortcut=1)


def test_for_compare_on_a_tiny_model():
    base = tiny()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    train = SimpleNamespace(images=torch.randn(128, 3, 16, 16, generator=g), labels=torch.randint(0, 4, (128,), generator=g))
    out = stvit.for_compare(base, train, "smoke")
    assert isinstance(out, Reduced) and not out.model.training
    assert out.tokens_per_block == [17.0, 10.0] and out.gflops is None and out.note
    assert out.model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    again = stvit.for_compare(base, train, "smoke")  # deterministic
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in out.model.state_dict().items())
    assert out.extra["history"]["step"][-1] == 5, "the chapter's smoke budget"
    other = stvit.for_compare(base, train, "smoke", seed=1)
    assert not all(torch.equal(v, other.model.state_dict()[k]) for k, v in out.model.state_dict().items())


def test_finetune_is_the_chapter_recipe():
    base = tiny()
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
    hist = stvit.finetune(stvit.semantic_vit(base, at=1, pool=2), train, profile="smoke", steps=3)
    assert hist["step"][-1] == 3 and hist["lr"][-1] < 1e-4, "cosine from the chapter's lr 1e-4"
    assert stvit.DEFAULTS == dict(at=3, pool=3, layer_scale_init=1.0, shortcut=True)
