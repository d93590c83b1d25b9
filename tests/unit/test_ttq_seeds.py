"""The arithmetic of ``bench/ttq_seeds.py``: timing loopback curves with a timed run's clock,
paired / all-pairs / mean-curve speedups over seeds (the training runs themselves take hours;
these checks use synthetic curves)."""
import pytest

from tests.unit.test_bench_parsers import _bench

TIMES_DENSE = [0.0, 100.0, 200.0, 300.0, 400.0]
TIMES_FAST = [0.0, 50.0, 100.0, 150.0, 200.0]
BASE = [8.0, 6.0, 5.0, 4.5, 4.0]


def _curve(times, losses):
    return list(zip(times, losses))


def test_timed_curve_puts_losses_on_the_timed_runs_clock_and_refuses_other_lengths():
    seeds = _bench("ttq_seeds")
    timed = {"curve": _curve(TIMES_FAST, BASE)}
    assert seeds.timed_curve(timed, [9.0, 7.0, 6.0, 5.0, 4.5], source="x") == \
        _curve(TIMES_FAST, [9.0, 7.0, 6.0, 5.0, 4.5])
    with pytest.raises(SystemExit, match="4 validation points, the timed run 5"):
        seeds.timed_curve(timed, [9.0, 7.0, 6.0, 5.0], source="x")


def test_speedup_of_identical_losses_is_the_ratio_of_the_clocks():
    seeds = _bench("ttq_seeds")
    dense, fast = _curve(TIMES_DENSE, BASE), _curve(TIMES_FAST, BASE)
    assert seeds.speedup(dense, fast) == pytest.approx(2.0)
    assert seeds.speedup(dense, dense) == pytest.approx(1.0)
    # a variant that ends above the dense final loss never reaches it
    assert seeds.speedup(dense, _curve(TIMES_FAST, [x + 1 for x in BASE])) is None


def test_summarize_pairs_seeds_counts_pairs_and_averages_curves():
    seeds = _bench("ttq_seeds")
    dense = {1: _curve(TIMES_DENSE, BASE), 2: _curve(TIMES_DENSE, [x + 0.2 for x in BASE])}
    # seed 1 of the variant is the dense seed 1 curve on a 2x clock; seed 2 ends too high
    variant = {1: _curve(TIMES_FAST, BASE), 2: _curve(TIMES_FAST, [x + 0.5 for x in BASE])}
    report = seeds.summarize(dense, variant)
    paired = {r["seed"]: r for r in report["per_seed"]}
    assert paired[1]["speedup"] == pytest.approx(2.0)
    assert paired[2]["speedup"] is None
    assert paired[2]["dense_final"] == pytest.approx(4.2)
    assert paired[2]["variant_final"] == pytest.approx(4.5)
    pairs = report["pairs"]
    # variant seed 1 reaches both dense seeds (dense seed 2 ends higher: sooner), seed 2 neither
    assert (pairs["count"], pairs["reached"]) == (4, 2)
    assert pairs["max_reached"] > 2.0 and pairs["min_reached"] == pytest.approx(2.0)
    assert pairs["median_of_all"] is None   # two of four never get there
    cells = {(m["dense_seed"], m["variant_seed"]): m["speedup"] for m in pairs["matrix"]}
    assert cells[(1, 1)] == pytest.approx(2.0) and cells[(2, 1)] == pairs["max_reached"]
    assert cells[(1, 2)] is None and cells[(2, 2)] is None
    mean = report["mean_curve"]
    assert mean["dense"] == _curve(TIMES_DENSE, [x + 0.1 for x in BASE])
    assert mean["variant"] == _curve(TIMES_FAST, [x + 0.25 for x in BASE])
    assert mean["speedup"] is None          # the mean variant ends 0.15 above the dense mean
    # where the mean variant ends, dense gets later than the 2x clock lets the variant
    assert 1.0 < mean["speedup_at_variant_final"] < 2.0


def test_median_counts_unreached_pairs_as_slowest():
    seeds = _bench("ttq_seeds")
    assert seeds._median_with_unreached([2.0, None, 1.5]) == pytest.approx(1.5)
    assert seeds._median_with_unreached([2.0, 1.0, 1.5, 3.0]) == pytest.approx(1.75)
    assert seeds._median_with_unreached([2.0, None, None]) is None
    assert seeds._median_with_unreached([]) is None


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    seeds = _bench("ttq_seeds")
    dense = {1: _curve(TIMES_DENSE, BASE), 2: _curve(TIMES_DENSE, [x + 0.1 for x in BASE])}
    variant = {1: _curve(TIMES_FAST, BASE)}
    seeds.plot(dense, variant, ("none", "lsh"), tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_missing_timed_run_is_one_clear_sentence(tmp_path):
    seeds = _bench("ttq_seeds")
    with pytest.raises(SystemExit, match="is missing .* run bench/time_to_quality.py --model "
                                         "roberta --variants lsh-nocomp@650 first"):
        seeds.timed_run(tmp_path, "roberta", "lsh-nocomp", 650, bandwidth=250.0, micro_batch=16)
