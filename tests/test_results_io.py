"""Results in a notebook: short reprs, save/load without pickle, picklable MLPs."""

import json
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
from efftheory import _io
from efftheory import compare as cmp

X3 = np.random.default_rng(7).normal(size=(3, 5))


@pytest.fixture(scope="module")
def fw():
    return et.finite_width(et.MLP(5, 32, "relu", C_W=2.0), X3)


def _same_arrays(a, b, names):
    for k in names:
        u, v = np.asarray(getattr(a, k)), np.asarray(getattr(b, k))
        assert u.dtype == v.dtype and u.shape == v.shape, k
        assert u.tobytes() == v.tobytes(), f"{k} differs after the round trip"


# ------------------------------------------------------------------------------------------ repr
def test_finite_width_repr_is_short_and_informative(fw):
    r = repr(fw)
    assert len(r) < 1000, len(r)
    assert "FiniteWidth(" in r and "N=3" in r and "layers=5" in r and "depth=5" in r
    assert "V=(5, 3, 3, 3, 3) float64" in r and "K=(5, 3, 3) float64" in r
    assert "relu" in r and "tol=1e-09" in r
    p = repr(fw.at_width(64))
    assert len(p) < 1000 and "four_point=(5, 3, 3, 3, 3)" in p and "n=[inf, 64, 64, 64, 64]" in p


def test_other_result_reprs_are_short():
    net = et.MLP(4, 16, "tanh")
    inf = et.infinite_width(net, X3)
    assert len(repr(inf)) < 600 and "N=3" in repr(inf) and "layers=4" in repr(inf)
    sel = et.infinite_width(net, X3, layers=[2, 4])
    assert "layers=(2, 4)" in repr(sel)
    diag = et.finite_width_diagonal(net, X3)
    assert len(repr(diag)) < 800 and "G1=(4, 3) float64" in repr(diag)
    crit = et.critical_init("tanh")
    assert repr(crit).startswith("Criticality(") and "C_W=1.0" in repr(crit)


# ------------------------------------------------------------------------------------------ save/load
FW_FIELDS = ("K", "Theta", "G1", "V", "H1", "A", "B", "D", "F")


def test_finite_width_round_trip(fw, tmp_path):
    path = fw.save(tmp_path / "fw.npz")
    back = et.FiniteWidth.load(path)
    _same_arrays(fw, back, FW_FIELDS)
    assert back.net == fw.net and back.tol == fw.tol == 1e-9
    assert isinstance(back.K, type(jnp.zeros(1)))
    meta = _io.read_meta(path)
    assert meta["kind"] == "FiniteWidth" and meta["efftheory"] == et.__version__
    assert meta["object"]["fields"]["net"]["$mlp"]["activation"] == "relu"
    with np.load(path, allow_pickle=False) as z:  # plain npz, readable without efftheory
        assert np.asarray(z["V"]).shape == (5, 3, 3, 3, 3)
    with pytest.raises(ValueError, match="holds a FiniteWidth"):
        et.InfiniteWidth.load(path)


def test_finite_width_round_trip_uneven_widths_and_leaky(tmp_path):
    net = et.MLP(3, [6, 9], "leaky_relu(0.123456789)", C_W=[1.5, 1.25, 2.0], C_b=[0.1, 0.0, 0.2], lambda_W=0.5)
    fw = et.finite_width(net, X3[:2], tol=1e-7)
    back = et.FiniteWidth.load(fw.save(tmp_path / "leaky.npz"))
    _same_arrays(fw, back, FW_FIELDS)
    assert back.net == net and back.tol == 1e-7
    assert back.net.hidden_widths == (6, 9) and back.net.lambda_Ws == (0.5, 0.5, 0.5)
    diag = et.finite_width_diagonal(net, X3)
    dback = et.FiniteWidthDiagonal.load(diag.save(tmp_path / "diag.npz"))
    _same_arrays(diag, dback, FW_FIELDS)


def test_infinite_width_round_trip(tmp_path):
    net = et.MLP(6, 10, "gelu", C_W=1.7, C_b=0.05)
    for layers in (None, [1, 3, 6]):
        inf = et.infinite_width(net, X3, layers=layers)
        back = et.InfiniteWidth.load(inf.save(tmp_path / f"inf{layers is None}.npz"))
        _same_arrays(inf, back, ("K", "Theta"))
        assert back.net == net and back.layers == inf.layers


def test_save_refuses_a_user_activation(tmp_path):
    inf = et.infinite_width(et.MLP(2, 4, lambda z: jnp.tanh(z)), X3)
    with pytest.raises(ValueError, match="user callable"):
        inf.save(tmp_path / "x.npz")


def test_report_round_trip(tmp_path):
    x = cmp.default_inputs(2, 6, seed=3)
    rep = cmp.compare(et.MLP(3, 8, "tanh"), x, (8, 16, 32), 24, 3, progress=False)
    paths = rep.save(tmp_path / "out")
    assert set(paths) >= {"report", "table", "data"}
    for p in (tmp_path / "out", paths["data"]):
        back = cmp.Report.load(p)
        assert back.config == rep.config and back.versions == rep.versions and back.timings == rep.timings
        assert np.asarray(back.x).tobytes() == np.asarray(rep.x).tobytes()
        _same_arrays(rep.theory, back.theory, FW_FIELDS)
        assert back.theory.net == rep.theory.net
        assert set(back.comparisons) == set(rep.comparisons)
        for k, c in rep.comparisons.items():
            b = back.comparisons[k]
            _same_arrays(c, b, ("widths", "measured", "stderr", "infinite", "first_order"))
            assert b.layers == c.layers and b.statistic == c.statistic
            assert b.rows == c.rows or all(_rows_equal(u, v) for u, v in zip(b.rows, c.rows, strict=True))
            assert len(b.fits) == len(c.fits) and all(_rows_equal(u, v) for u, v in zip(b.fits, c.fits))
        _same_arrays(rep.depth_profile, back.depth_profile, ("layers", "widths", "theory", "measured", "stderr"))
        assert back.to_json() == rep.to_json()  # the same report, NaNs included
        assert back.table() == rep.table() and back.fit_table() == rep.fit_table()
    assert len(repr(rep)) < 1000 and "tanh" in repr(rep)


def _rows_equal(u, v):
    """Dataclass rows field by field, NaN equal to NaN (bitwise floats)."""
    import dataclasses

    assert type(u) is type(v)
    for f in dataclasses.fields(u):
        a, b = getattr(u, f.name), getattr(v, f.name)
        if isinstance(a, float):
            assert np.float64(a).tobytes() == np.float64(b).tobytes(), f.name
        else:
            assert a == b, f.name
    return True


def test_meta_is_strict_json(fw, tmp_path):
    path = fw.save(tmp_path / "fw.npz")
    with np.load(path, allow_pickle=False) as z:
        json.loads(z["__meta__.json"].item(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# ------------------------------------------------------------------------------------------ MLP
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "leaky_relu(0.2)", "leaky_relu(-0.3725)", "swish"])
def test_mlp_pickles_by_registry_name(act):
    net = et.MLP(4, [8, 16, 8], act, C_W=[1.0, 2.0, 1.5, 1.0], C_b=0.1, lambda_b=0.0, output_width=2)
    back = pickle.loads(pickle.dumps(net))
    assert back == net and hash(back) == hash(net)
    assert back.hidden_widths == (8, 16, 8) and back.C_Ws == (1.0, 2.0, 1.5, 1.0) and back.output_width == 2
    z = jnp.linspace(-3, 3, 13)
    assert np.array_equal(np.asarray(back.sigma(z)), np.asarray(net.sigma(z)))
    assert et.MLP.from_dict(json.loads(json.dumps(net.to_dict()))) == net


def test_leaky_relu_slope_is_exact():
    net = et.MLP(2, 4, "leaky_relu(0.123456789012)")
    back = pickle.loads(pickle.dumps(net))
    assert back.sigma(jnp.asarray(-1.0)) == -0.123456789012
    assert net.to_dict()["activation"] == "leaky_relu(0.123456789012)"


def test_mlp_with_lambda_gives_a_clear_pickling_error():
    net = et.MLP(2, 4, lambda z: jnp.tanh(z))
    with pytest.raises(pickle.PicklingError, match="registry activation.*module-level def"):
        pickle.dumps(net)
    with pytest.raises(ValueError, match="user callable"):
        net.to_dict()


def _module_level_sigma(z):
    return jnp.tanh(z) * 0.5


def test_mlp_with_module_level_function_pickles_by_reference():
    net = et.MLP(3, 4, _module_level_sigma)
    back = pickle.loads(pickle.dumps(net))
    assert back == net and back.sigma.fn is _module_level_sigma


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown MLP arguments"):
        et.MLP.from_dict({"depth": 2, "widht": 4})
    d = et.MLP(3, 7, "erf", C_W=1.3).to_dict()
    assert d == {"depth": 3, "width": 7, "activation": "erf", "C_W": 1.3, "C_b": 0.0, "lambda_W": 1.3,
                 "lambda_b": 0.0, "output_width": 1}
