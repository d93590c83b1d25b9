"""The arithmetic behind ``bench/time_to_quality.py``'s speedups: smoothing, the first time a
curve reaches a loss, and the speedup table built from them (the runs themselves need root
and an hour; these checks do not)."""
import json

import pytest

from tests.unit.test_bench_parsers import _bench


def _run(variant, times, losses, ms_per_iter, model="gpt"):
    return {"model": model, "variant": variant, "curve": list(zip(times, losses)),
            "ms_per_iter": ms_per_iter, "a2a_share": 0.4, "bandwidth_mbit": 250.0}


def test_smooth_keeps_constants_and_lines_and_sigma_zero_is_identity():
    ttq = _bench("time_to_quality")
    assert ttq.smooth([3.0] * 7) == pytest.approx([3.0] * 7)
    values = [5.0, 1.0, 4.0, 2.0]
    assert ttq.smooth(values, sigma=0) == values
    # symmetric weights keep a line's interior points on the line; the edges are pulled inward
    line = [float(i) for i in range(9)]
    assert ttq.smooth(line)[4] == pytest.approx(4.0)
    assert ttq.smooth(line)[0] > 0.0 and ttq.smooth(line)[-1] < 8.0
    # and a spike is spread over its neighbours
    spiky = ttq.smooth([1.0, 1.0, 5.0, 1.0, 1.0])
    assert spiky[2] < 5.0 and spiky[1] > 1.0


def test_time_to_reach_interpolates_and_says_when_never_reached():
    ttq = _bench("time_to_quality")
    times, losses = [0.0, 10.0, 20.0, 30.0], [8.0, 6.0, 4.0, 3.0]
    assert ttq.time_to_reach(times, losses, 5.0) == pytest.approx(15.0)
    assert ttq.time_to_reach(times, losses, 4.0) == pytest.approx(20.0)
    assert ttq.time_to_reach(times, losses, 9.0) == 0.0
    assert ttq.time_to_reach(times, losses, 2.0) is None


def test_summarize_measures_speedup_to_the_dense_final_loss():
    ttq = _bench("time_to_quality")
    losses = [8.0, 6.0, 5.0, 4.5, 4.2, 4.0]
    dense = _run("none", [0, 100, 200, 300, 400, 500], losses, 1000.0)
    twice_as_fast = _run("lsh", [0, 50, 100, 150, 200, 250], losses, 500.0)
    worse = _run("cast", [0, 50, 100, 150, 200, 250], [x + 0.5 for x in losses], 500.0)
    rows = {r["variant"]: r for r in ttq.summarize([dense, twice_as_fast, worse])["rows"]}
    assert rows["none"]["speedup"] == pytest.approx(1.0)
    assert rows["lsh"]["speedup"] == pytest.approx(2.0)
    assert rows["lsh"]["per_iteration_speedup"] == pytest.approx(2.0)
    assert rows["cast"]["seconds_to_target"] is None and rows["cast"]["speedup"] is None
    # it ends above dense: compared where dense reaches the loss it ends at instead
    assert rows["cast"]["speedup_at_own_final"] is not None
    assert 0.0 < rows["cast"]["speedup_at_own_final"] < 2.0
    assert rows["cast"]["final_valid"] == pytest.approx(4.5)


def test_summarize_keeps_models_apart(tmp_path):
    ttq = _bench("time_to_quality")
    runs = [_run("none", [0, 10, 20], [5.0, 4.0, 3.0], 100.0),
            _run("none", [0, 10, 20], [9.0, 8.0, 7.0], 100.0, model="roberta"),
            _run("lsh", [0, 5, 10], [9.0, 8.0, 7.0], 50.0, model="roberta")]
    rows = ttq.summarize(runs)["rows"]
    assert rows[2]["target"] == pytest.approx(ttq.smooth([9.0, 8.0, 7.0])[-1])
    assert rows[2]["speedup"] == pytest.approx(2.0)
    path = tmp_path / "ttq.png"
    ttq.plot(runs, path)
    assert path.stat().st_size > 1000
    json.dumps(ttq.summarize(runs))     # the report is what the script writes as JSON


def test_variant_specs_name_a_known_variant_and_an_iteration_count():
    ttq = _bench("time_to_quality")
    assert ttq.parse_variant("lsh-nocomp@650", 500) == ("lsh-nocomp", 650)
    assert ttq.parse_variant("none", 500) == ("none", 500)
    with pytest.raises(SystemExit, match="unknown variant"):
        ttq.parse_variant("lsh-L99", 500)
    with pytest.raises(SystemExit, match="iteration count"):
        ttq.parse_variant("none@many", 500)
