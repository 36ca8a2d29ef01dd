"""The benchmark report's paired comparison with full context: the mean per-sample score difference and its
95% paired bootstrap interval (the project's rule for a quality claim)."""
import pytest

from ctxopt.bench import report as rep


def test_paired_difference_pairs_by_sample_and_counts_errors_as_zero():
    baseline = [{"sample_id": i, "score": s} for i, s in enumerate([1, 1, 0, 1])]
    rows = [{"sample_id": 3, "score": 0}, {"sample_id": 0, "score": 1}, {"sample_id": 2, "score": 1},
            {"sample_id": 1, "score": "", "error": "boom"}, {"sample_id": 9, "score": 1}]  # 9: no baseline
    paired = rep.paired_difference(rows, baseline)
    assert paired["n"] == 4 and paired["mean"] == pytest.approx((-1 + 0 + 1 - 1) / 4)
    assert paired["low"] <= paired["mean"] <= paired["high"] and -1 <= paired["low"] and paired["high"] <= 1
    assert rep.paired_difference(rows, None) is None


def test_the_bootstrap_interval_is_degenerate_without_spread_and_widens_with_it():
    assert rep.bootstrap_interval([0.5] * 20) == (0.5, 0.5)
    narrow = rep.bootstrap_interval([0.0, 0.1] * 50)
    wide = rep.bootstrap_interval([-1.0, 1.1] * 50)
    assert narrow[0] < 0.05 < narrow[1] and wide[1] - wide[0] > 10 * (narrow[1] - narrow[0])
    assert rep.bootstrap_interval([0.0, 1.0] * 100, seed=3) == rep.bootstrap_interval([0.0, 1.0] * 100, seed=3)


def test_the_table_shows_the_difference_in_points():
    assert rep._difference({"mean": -0.05, "low": -0.15, "high": 0.04, "n": 50}) == "-5.0[-15.0,+4.0]"
    assert rep._difference(None) == "-"
