"""Patch-size scaling (CURRICULUM.md #16): the sweep's configurations and the power-law fit."""
import pytest

from vitlab.methods.architectures import patch_scaling as S
from vitlab.methods.architectures import recipes
from vitlab.models import create_model


def test_only_the_patch_size_changes():
    models = {p: create_model(recipes.model_name(S.method_name(p))) for p in S.PATCHES}
    for p, m in models.items():
        assert m.patch_embed.patch_size == p and m.patch_embed.num_patches == S.tokens(p)
        assert len(m.blocks) == 4 and m.embed_dim == 64
    # parameters differ only in the patch projection (p^2 x 64 + 64) and the position table (tokens + 1) x 64
    n = {p: sum(x.numel() for x in m.parameters()) for p, m in models.items()}
    assert n[8] - n[1] == (64 * 64 - 1 * 64) + (1 - 64) * 64
    assert recipes.registered(S.method_name(4)) == "digits8"
    assert [S.tokens(p) for p in S.PATCHES] == [1, 4, 16, 64]


def test_the_comparison_row_is_the_plain_vit_at_patch_2():
    from vitlab import zoo

    model, plain = (create_model(recipes.model_name(m)) for m in ("vit_patch2", "vit"))
    assert model.patch_embed.num_patches == 196 == 4 * plain.patch_embed.num_patches
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    cfg, plain_cfg = (zoo.ZOO[recipes.entry_name(m, 0)].config("cpu") for m in ("vit_patch2", "vit"))
    assert cfg.pop("model") == "ch1_vit_patch2" and plain_cfg.pop("model") == "ch1_vit" and cfg == plain_cfg


def test_power_law_fit_recovers_a_known_law():
    n = [1, 4, 16, 64]
    errors = [0.5 * x ** -0.3 for x in n]
    a, alpha = S.fit_power_law(n, errors)
    assert a == pytest.approx(0.5) and alpha == pytest.approx(0.3)


def test_attention_flops_grow_with_the_square_of_tokens():
    assert S.attention_flops(63) == 4 * S.attention_flops(31) * (64 / 32) ** 2 / 4


@pytest.mark.parametrize("call, match", [
    (lambda: S.method_name(3), "method_name: patch_size must be one of"),
    (lambda: S.tokens(3), "tokens: patch_size=3 does not divide img_size=8"),
    (lambda: S.fit_power_law([1, 2], [0.1]), "fit_power_law: n_tokens and errors must be 1-D of the same length"),
    (lambda: S.fit_power_law([1, 2], [0.1, 0.0]), "fit_power_law: n_tokens and errors must be positive"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
