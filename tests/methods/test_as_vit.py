"""As-ViT's training-free scores (official VITA-Group/AsViT, lib/procedures/teg.py and ntk.py; CURRICULUM.md #22)
on cases with a known answer."""
import math

import pytest
import torch
import torch.nn as nn

from vitlab import stats
from vitlab.methods.architectures import as_vit as A


def test_the_curve_is_a_unit_circle_in_input_space():
    x, dx = A.curve((1, 4, 4), n_points=50, seed=0)
    flat, dflat = x.reshape(50, -1), dx.reshape(50, -1)
    torch.testing.assert_close(flat.norm(dim=1), torch.ones(50))
    torch.testing.assert_close((flat * dflat).sum(1), torch.zeros(50), atol=1e-6, rtol=0)  # tangent
    torch.testing.assert_close(flat[0], flat[-1], atol=1e-6, rtol=0)  # closed: theta 0 and 2 pi


def test_length_distortion_of_an_isometry_is_the_number_of_points():
    """f = flatten keeps lengths: ||df/dtheta|| = ||dx/dtheta|| = 1 at each of the n points."""
    assert A.length_distortion(nn.Flatten(), (1, 4, 4), n_points=40, batch_size=16) == pytest.approx(40, rel=1e-5)


def test_length_distortion_scales_with_a_linear_map():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        lin[1].weight.copy_(3 * torch.eye(16))
    assert A.length_distortion(lin, (1, 4, 4), n_points=20) == pytest.approx(60, rel=1e-5)


def test_norms_are_stripped_from_a_copy():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Sequential(nn.BatchNorm1d(4)))
    stripped = A.strip_norms(model)
    assert isinstance(stripped[1], nn.Identity) and isinstance(stripped[2][0], nn.Identity)
    assert isinstance(model[1], nn.LayerNorm), "the original keeps its norms"


def test_ntk_condition_of_a_linear_model_by_hand():
    """f(x) = W x with C outputs: the gradient of sum_c f_c w.r.t. W is 1 x^T, so K = C X X^T. Two orthogonal
    inputs of norms 1 and 2: eigenvalues C and 4C, condition 4."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    x[1, 0, 1, 1] = 2.0
    assert A.ntk_condition(model, x) == pytest.approx(4.0)
    same = torch.stack([x[0], x[0]])  # two identical examples: a singular kernel
    assert A.ntk_condition(model, same) == math.inf


def test_kendall_tau_is_the_course_one():
    assert A.kendall_tau is stats.kendall_tau  # pinned by hand in tests/test_stats.py


def test_scores_average_over_fresh_initialisations():
    build = lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 3))  # noqa: E731
    out = A.scores(build, torch.rand(4, 1, 4, 4), seeds=(0, 1), n_points=10)
    assert len(out["per_seed"]) == 2 and out["per_seed"][0]["length"] != out["per_seed"][1]["length"]
    assert out["length"] == pytest.approx(sum(r["length"] for r in out["per_seed"]) / 2)


def test_rank_best_sums_the_two_ranks_as_the_official_search():
    # ntk ascending [5, 5, 10, 20]: the tied 5s share rank 0; length descending [3, 2, 1, 0.5]
    scores = {"a": dict(ntk=10.0, length=1.0),  # 2 + 2
              "b": dict(ntk=5.0, length=2.0),  # 0 + 1: the pick
              "c": dict(ntk=20.0, length=3.0),  # 3 + 0
              "d": dict(ntk=5.0, length=0.5)}  # 0 + 3
    assert A.rank_sums(scores) == {"a": 4, "b": 1, "c": 3, "d": 3}
    assert A.rank_best(scores) == "b"
    assert A.rank_best({"x": dict(ntk=1.0, length=1.0), "y": dict(ntk=1.0, length=1.0)}) == "x"  # ties: first


@pytest.mark.parametrize("call, match", [
    (lambda: A.rank_sums({}), "rank_sums: scores must be"),
    (lambda: A.rank_sums({"a": {"ntk": 1.0}}), r"rank_sums: scores\['a'\] must hold"),
    (lambda: A.curve((1, 2, 2), n_points=1), "curve: n_points must be"),
    (lambda: A.ntk_condition(nn.Flatten(), torch.rand(2, 4)), "ntk_condition: images must be"),
    (lambda: A.ntk_condition(3, torch.rand(2, 1, 2, 2)), "ntk_condition: model must be"),
    (lambda: A.strip_norms("vit"), "strip_norms: model must be"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
