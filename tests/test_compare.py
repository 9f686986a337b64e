"""efftheory.compare: theory beside measurement, rows/fits/JSON, resumable and reproducible reports."""

import json
import math
import os

import numpy as np
import pytest

import efftheory as et
from efftheory import compare as cmp
from efftheory import empirical as em
from efftheory.reports._table import pm

NET = et.MLP(3, 8, "tanh", C_W=1.0, C_b=0.0)
WIDTHS = (8, 16, 32)
M = 50
SEED = 5


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("compare_cache"))


@pytest.fixture(scope="module")
def x():
    return cmp.default_inputs(2, 8, seed=SEED)


@pytest.fixture(scope="module")
def report(x, cache_dir):
    return cmp.compare(NET, x, WIDTHS, M, SEED, cache_dir=cache_dir, progress=False)


@pytest.fixture(scope="module")
def sweep(report, x, cache_dir):
    # the same ensembles, read back from the cache the report wrote
    return em.sample(NET.with_width(WIDTHS[0]), x, WIDTHS, M, SEED, statistics=("metric", "four_point", "ntk",
                     "ntk_variance"), dtype="float32", progress=False, cache_dir=cache_dir)


def _rows(report, statistic):
    return [r for r in report.rows if r.statistic == statistic]


def test_report_structure(report):
    assert set(report.comparisons) == {"metric", "four_point", "ntk_mean", "ntk_variance"}
    assert report.comparisons["metric"].layers == (1, 2, 3)
    assert report.comparisons["ntk_mean"].layers == (3,)
    assert report.config["widths"] == list(WIDTHS)
    assert report.config["seed"] == SEED and report.config["n_networks"] == M
    assert report.config["dtype"] == "float32"
    assert set(report.versions) >= {"efftheory", "jax", "numpy"}
    assert {"theory", "sampling", "estimates"} <= set(report.timings)
    # every symmetry-distinct entry, every layer, every width (N = 2: 3 metric entries, 6 four-point entries)
    assert len(_rows(report, "metric")) == 3 * 3 * len(WIDTHS)
    # the output layer has one neuron: no cross-neuron four-point function there
    assert {r.layer for r in _rows(report, "four_point")} == {1, 2}
    assert len(_rows(report, "four_point")) == 6 * 2 * len(WIDTHS)
    assert len(_rows(report, "ntk_variance")) == 6 * len(WIDTHS)
    assert any(r.shown for r in report.rows) and not all(r.shown for r in report.rows)


def test_measured_values_are_the_empirical_estimates(report, sweep):
    metric = sweep.estimate(em.metric)
    fp = sweep.estimate(em.four_point)
    nm = sweep.estimate(em.ntk_mean)
    nv = sweep.estimate(em.ntk_variance).cov
    for r in report.rows:  # same normalisation as at_width(n): the estimates go into the report unscaled
        w = WIDTHS.index(r.width)
        if r.statistic == "metric":
            ref, se = metric.value[(w, r.layer - 1) + r.entry], metric.stderr[(w, r.layer - 1) + r.entry]
        elif r.statistic == "four_point":
            idx = (w, r.layer - 1) + r.entry
            ref, se = fp.value[idx], fp.stderr[idx]
        elif r.statistic == "ntk_mean":
            ref, se = nm.value[(w,) + r.entry], nm.stderr[(w,) + r.entry]
        else:
            ref, se = nv.value[(w,) + r.entry], nv.stderr[(w,) + r.entry]
        assert r.measured == pytest.approx(float(ref), rel=1e-12, abs=1e-15)
        assert r.stderr == pytest.approx(float(se), rel=1e-12, abs=1e-15)


def test_predictions_are_the_first_order_theory(report):
    theory = report.theory
    for r in report.rows:
        p = theory.at_width(r.width)
        l = r.layer - 1
        if r.statistic == "metric":
            inf, first = theory.K[(l,) + r.entry], p.metric[(l,) + r.entry]
        elif r.statistic == "four_point":
            inf, first = 0.0, p.four_point[(l,) + r.entry]
        elif r.statistic == "ntk_mean":
            inf, first = theory.Theta[(l,) + r.entry], p.ntk_mean[(l,) + r.entry]
        else:
            inf, first = 0.0, p.ntk_cov[(l,) + r.entry]
        assert r.predicted_infinite == pytest.approx(float(inf), rel=1e-12, abs=1e-14)
        assert r.predicted_first_order == pytest.approx(float(first), rel=1e-10, abs=1e-14)


def test_fits_follow_the_width_sweep_protocol(report):
    comp = report.comparisons["ntk_variance"]
    assert len(comp.fits) == 6
    f = comp.fit(3, (0, 0, 0, 0))
    m, s, a, c1 = comp.series(3, (0, 0, 0, 0))
    ref = em.width_sweep_fit(WIDTHS, m, s, infinite=a, first_order=c1)
    assert f.order == 2
    assert f.a == pytest.approx(float(ref.a)) and f.c1 == pytest.approx(float(ref.c1))
    assert f.predicted_c1 == pytest.approx(c1) and f.predicted_a == 0.0
    assert isinstance(f.agrees, bool) and f.verdict in em.VERDICTS and f.agrees == (f.verdict == "agrees")
    assert f.verdict == em.verdict(ref, a, c1, scale=em.c1_scale(0.0, comp.first_order[0], WIDTHS[0]))
    # layer 1 has no 1/n correction
    assert all(g.predicted_c1 == 0.0 for g in report.comparisons["four_point"].fits if g.layer == 1)


def test_json_has_every_number_and_is_strict(report):
    text = report.to_json()
    data = json.loads(text)  # strict JSON: NaN/inf would have raised in to_json
    assert data["config"]["seed"] == SEED
    assert data["config"]["network"]["activation"] == "tanh"
    assert data["versions"]["efftheory"] == et.__version__
    assert len(data["rows"]) == len(report.rows)
    assert len(data["fits"]) == len(report.fits)
    row = data["rows"][0]
    assert set(row) >= {"statistic", "layer", "entry", "width", "measured", "stderr", "predicted_infinite",
                        "predicted_first_order"}
    by_key = {(r["statistic"], r["layer"], tuple(r["entry"]), r["width"]): r for r in data["rows"]}
    for r in report.rows:
        d = by_key[(r.statistic, r.layer, r.entry, r.width)]
        assert d["measured"] == r.measured and d["predicted_first_order"] == r.predicted_first_order
    assert np.asarray(data["theory"]["V"]).shape == (3, 2, 2, 2, 2)
    assert data["depth_profile"]["measured"][0][-1] is None  # NaN -> null
    # three verdicts, counted separately
    counts = data["verdict_counts"]
    assert list(counts) == ["agrees", "consistent, unresolved", "disagrees"]
    assert sum(counts.values()) == len(report.fits)
    for k, v in counts.items():
        assert v == sum(f["verdict"] == k for f in data["fits"]) == sum(f.verdict == k for f in report.fits)
    assert "resolved" in data["columns"]["verdict"]


def test_table_text(report):
    table = report.table()
    assert "measured ± stderr" in table and "theory n=∞" in table and "theory 1st order" in table
    for name in ("metric", "four_point", "ntk_mean", "ntk_variance"):
        assert name in table
    assert "±" in report.fit_table() and "verdict" in report.fit_table()
    c = cmp.verdict_counts(report.fits)
    assert cmp.verdict_summary(report.fits) == (
        f"{len(report.fits)} width-sweep fits: {c['agrees']} agree (c1 resolved), {c['consistent, unresolved']} "
        f"consistent but unresolved, {c['disagrees']} disagree")
    body = report.fit_table(all_rows=True).splitlines()[3:]
    assert sum(line.endswith("consistent, unresolved") for line in body) == c["consistent, unresolved"]
    assert sum(line.endswith("DISAGREES") for line in body) == c["disagrees"]
    assert len(report.table(all_rows=True).splitlines()) > len(table.splitlines())


def test_rerun_from_cache_gives_the_identical_report(report, x, cache_dir):
    again = cmp.compare(NET, x, WIDTHS, M, SEED, cache_dir=cache_dir, progress=False)
    assert again.to_json() == report.to_json()
    # an interrupted run: one chunk missing -> recomputed, same numbers
    chunks = sorted(f for f in os.listdir(cache_dir) if f.endswith(".npz"))
    assert chunks
    os.remove(os.path.join(cache_dir, chunks[len(chunks) // 2]))
    resumed = cmp.compare(NET, x, WIDTHS, M, SEED, cache_dir=cache_dir, progress=False)
    assert resumed.to_json() == report.to_json()
    assert sorted(f for f in os.listdir(cache_dir) if f.endswith(".npz")) == chunks


def test_save_writes_report_and_table(report, tmp_path):
    paths = report.save(tmp_path / "out")
    assert json.loads(open(paths["report"]).read())["config"]["seed"] == SEED
    assert "width-sweep fits" in open(paths["table"]).read()


def test_four_point_depth_profile(report):
    prof = report.depth_profile
    assert prof.theory.shape == prof.measured.shape == (len(WIDTHS), 3)
    assert np.all(prof.theory[:, 0] == 0)                        # V^(1) = 0
    assert np.allclose(prof.theory[0] * WIDTHS[0], prof.theory[-1] * WIDTHS[-1])  # ~ 1/n
    assert np.all(np.isnan(prof.measured[:, -1]))                # one output neuron
    assert np.all(np.isfinite(prof.measured[:, :-1]))
    assert prof.reference  # tanh at criticality: (2/3) l / n


def test_comparison_rejects_a_theory_of_another_network(sweep):
    other = et.finite_width(et.MLP(2, 8, "tanh"), cmp.default_inputs(2, 8, seed=SEED))
    with pytest.raises(ValueError, match="shallower"):
        cmp.metric_comparison(sweep, other)
    with pytest.raises(ValueError, match="theory"):
        cmp.metric_comparison(sweep, "not a theory")


@pytest.mark.parametrize("kwargs, match", [
    (dict(net=et.MLP(1, 8, "tanh")), "depth"),
    (dict(net=et.MLP(3, [8, 16], "tanh")), "uniform"),
    (dict(widths=()), "widths"),
    (dict(widths=(8, 0)), "widths"),
    (dict(widths=(8, 8)), "distinct"),
    (dict(n_networks=1), "n_networks"),
    (dict(n_networks=0), "n_networks"),
    (dict(x=np.ones((9, 3))), "at most"),
    (dict(x=np.ones(3)), "x"),
    (dict(dtype="float16"), "dtype"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(net=NET, x=cmp.default_inputs(2), widths=WIDTHS, n_networks=M, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        cmp.compare(args.pop("net"), args.pop("x"), args.pop("widths"), args.pop("n_networks"), args.pop("seed"),
                    progress=False, **args)


def test_default_inputs():
    x = cmp.default_inputs(3, 8, seed=1)
    G = x @ x.T / 8
    assert x.shape == (3, 8)
    assert np.allclose(np.diag(G), 1.0)
    assert G[0, 1] == pytest.approx(0.6)
    assert np.array_equal(x, cmp.default_inputs(3, 8, seed=1))
    assert not np.array_equal(x, cmp.default_inputs(3, 8, seed=2))
    assert cmp.default_inputs(1).shape == (1, 8)
    with pytest.raises(ValueError):
        cmp.default_inputs(0)
    with pytest.raises(ValueError):
        cmp.default_inputs(2, correlation=1.0)


def test_pm_formatting():
    assert pm(0.123456, 0.0012) == "0.1235 ± 0.0012"
    assert pm(float("nan"), 1.0) == "—"
    assert "e" in pm(1.5e-12, 2e-13)
    assert math.isnan(cmp.Row("metric", 1, (0, 0), 8, 1.0, 0.0, 1.0, 1.0).pull)
