import math

import pytest

from vitlab import stats
from vitlab.stats import paired_gap, spread


def test_spread_by_hand():
    s = spread([1.0, 2.0, 3.0])  # sample std 1, so SE = 1 / sqrt(3)
    assert s.mean == 2.0 and s.n == 3 and math.isclose(s.se, 1 / math.sqrt(3))
    assert math.isclose(s.lower(), 2 - 2 / math.sqrt(3)) and math.isclose(s.upper(1), 2 + 1 / math.sqrt(3))
    assert f"{spread([0.5, 0.7]):.1%}" == "60.0 % ± 10.0 %"


def test_paired_gap_cancels_what_seeds_share():
    # the control moves a lot with the seed, the method is always 0.02 ahead: the gap has no spread
    g = paired_gap([0.62, 0.72, 0.52], [0.60, 0.70, 0.50])
    assert math.isclose(g.mean, 0.02) and g.se < 1e-12 and g.lower() > 0.019
    assert f"{g:+.1%}".startswith("+2.0 %")


def test_one_seed_checks_the_sign_only():
    g = paired_gap([0.6], [0.5])
    assert math.isnan(g.se) and g.lower() == g.mean == g.upper()
    assert "1 seed" in f"{g:.2f}"


@pytest.mark.parametrize("args, exc, word", [
    (([0.5, 0.6], [0.5]), ValueError, "one value per seed"),
    (([], []), ValueError, "method is empty"),
    (("abc", [0.5]), TypeError, "method"),
    (([float("nan")], [0.5]), ValueError, "finite"),
    (([True], [0.5]), ValueError, "finite"),
])
def test_bad_input(args, exc, word):
    with pytest.raises(exc, match=word):
        paired_gap(*args)


def test_kendall_tau_by_hand():
    assert stats.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert stats.kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert stats.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant pair
    assert stats.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 3)  # the tied pair counts as neither
    assert stats.kendall_tau([float("-inf"), 0.0], [1, 2]) == 1.0


@pytest.mark.parametrize("a, b, match", [([1, 2], [1], "same length"), ([1], [1], "same length"),
                                         ([1, float("nan")], [1, 2], "nan")])
def test_kendall_tau_bad_input(a, b, match):
    with pytest.raises(ValueError, match=f"kendall_tau: .*{match}"):
        stats.kendall_tau(a, b)



def test_late_loss_drop_by_hand():
    # 16 values, last eighth = the last 2: window before (4 + 4) / 2 = 4, last (2 + 2) / 2 = 2: (4 - 2) / 2 = 1
    assert stats.late_loss_drop([9] * 12 + [4, 4, 2, 2]) == pytest.approx(1.0)
    assert stats.late_loss_drop([1.0] * 16) == 0.0  # flat: plateaued
    assert stats.late_loss_drop([5, 3, 2, 2], fraction=0.5) == pytest.approx((4 - 2) / 2)
    with pytest.raises(ValueError, match="fraction"):
        stats.late_loss_drop([1.0] * 8, fraction=0.7)
    with pytest.raises(ValueError, match="at least 2"):
        stats.late_loss_drop([1.0])


def test_verdict_reads_the_gap_against_two_standard_errors():
    assert stats.verdict(stats.paired_gap([1.0, 1.2, 1.1], [0.0, 0.1, 0.0])) == "above"
    assert stats.verdict(stats.paired_gap([0.0, 0.1, 0.0], [1.0, 1.2, 1.1])) == "below"
    assert stats.verdict(stats.paired_gap([0.1, -0.1, 0.05], [0.0, 0.0, 0.0])) == "within the seed spread of"
    assert stats.verdict(stats.Spread(0.3, 0.1, 3)) == "above" and stats.verdict(stats.Spread(0.3, 0.1, 3), k=3) \
        == "within the seed spread of"
    with pytest.raises(TypeError, match="gap must be a Spread"):
        stats.verdict(0.3)
