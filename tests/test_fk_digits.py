"""examples/fk_digits.py in --smoke mode: well-formed, finite rows; the plot and the weight cache work.

Only facts that hold for any samples are asserted (the smoke models are too briefly trained for accuracy
claims): the best-of-K reward is at least the mean reward of the same K samples, FK's best particle at least
the FK particles' mean, K = 1 best-of-N is the base sampler itself, and a rerun from cached weights (fixed
seeds, one thread) gives the same table.
"""
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("base", "best-of-N", "FK best", "FK mean")


def load_example():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import fk_digits
    finally:
        sys.path.pop(0)
    return fk_digits


@pytest.mark.timeout(120)
def test_fk_digits_smoke(tmp_path):
    fk_digits = load_example()
    png, cache = tmp_path / "fk.png", tmp_path / "weights.pt"
    rows = fk_digits.main(["--smoke", "--out", str(png), "--cache", str(cache)])
    assert png.stat().st_size > 0 and cache.stat().st_size > 0

    quality = [r for r in rows if r["table"] == "quality"]
    assert sorted({r["K"] for r in quality}) == [1, 4]
    for K in (1, 4):
        cell = {r["method"]: r for r in quality if r["K"] == K}
        assert sorted(cell) == sorted(METHODS)
        assert len({r["nfe"] for r in cell.values()}) == 1  # the same model evaluations for every method
        for r in cell.values():
            assert math.isfinite(r["reward"]) and r["reward"] <= 1e-6, r  # a log-probability
            assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc2"] <= 1.0, r
        # per prompt, the max of K rewards is at least their mean, hence also averaged over prompts
        assert cell["best-of-N"]["reward"] >= cell["base"]["reward"] - 1e-6
        assert cell["FK best"]["reward"] >= cell["FK mean"]["reward"] - 1e-6
    k1 = {r["method"]: r for r in quality if r["K"] == 1}
    assert k1["best-of-N"]["reward"] == k1["base"]["reward"] and k1["best-of-N"]["acc"] == k1["base"]["acc"]

    over = [r for r in rows if r["table"] == "overhead"]
    loops = ("fusedlab FKSteering", "softmax + multinomial", "reference FKD step", "step + reward only")
    assert {(r["method"], r["every"]) for r in over} == {(m, e) for m in loops for e in (1, 2)}
    for r in over:
        assert r["B"] == 64 and r["K"] == 16
        # bookkeeping = run time minus the timed step and reward calls nested inside it: never negative
        assert r["total_s"] > 0 and r["bookkeeping_s"] >= 0 and 0 <= r["fraction"] < 1, r
        assert 0 <= r["net_s"] <= r["bookkeeping_s"], r
        assert all(math.isfinite(r[k]) for k in ("total_s", "step_s", "reward_s", "per_resample_us")), r

    again = fk_digits.main(["--smoke", "--cache", str(cache)])  # loads the weights instead of training
    assert [r for r in again if r["table"] == "quality"] == quality
