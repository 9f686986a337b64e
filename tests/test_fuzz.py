"""Fuzz every public entry point with malformed arguments (issue #8).

Each public callable of ``efftheory.__all__``, ``efftheory.empirical.__all__``, ``efftheory.compare.__all__``
and (when it exists) ``efftheory.predict.__all__`` is called with valid arguments in which one argument at a
time is replaced by something malformed: wrong types, wrong shapes, NaN/inf, negative or zero values, empty
arrays, strings, None and huge values.  The only exceptions allowed are the documented ones: ``ValueError``
(``CacheMismatchError`` is one) or ``TypeError``, with a message that names the argument.  NaN or inf in a
numeric argument must always be refused.

Callables this file has no valid arguments for (added to the package after it was written) still get a
generic check: every required argument malformed at once must give a documented error naming one of the
arguments.  The command line is fuzzed the same way through ``efftheory.cli.main(argv)``: exit status 2
and a single line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efftheory as et
import efftheory.compare as cmp
import efftheory.empirical as em
from efftheory import cli


# ------------------------------------------------------------------------------------------ malformed values
class _Opaque:
    def __repr__(self):
        return "<opaque object>"


BAD_TYPES = {
    "None": None,
    "str": "abc",
    "bytes": b"\x00\xff",
    "object": _Opaque(),
    "dict": {"a": 1},
    "complex": 1 + 2j,
    "mixed list": [[1.0, "a"]],
    "ragged list": [[1.0, 2.0], [3.0]],
}
BAD_NUMBERS = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "negative": -1,
    "negative float": -2.5,
    "zero": 0,
    "huge float": 1e308,
    "huge int": 2**70,
    "bool": True,
}
BAD_ARRAYS = {
    "empty": np.zeros((0,)),
    "empty 2-d": np.zeros((0, 3)),
    "nan array": np.full((2, 3), np.nan),
    "inf array": np.array([[1.0, np.inf, 0.0], [0.0, 1.0, 2.0]]),
    "rank 4": np.ones((2, 1, 2, 1)),
    "scalar array": np.array(3.0),
    "string array": np.array([["a", "b"]]),
    "object array": np.array([None, 1.0], dtype=object),
}
MALFORMED = {**BAD_TYPES, **BAD_NUMBERS, **BAD_ARRAYS}
NONFINITE = ("nan", "inf", "-inf", "nan array", "inf array")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """A malformed string may be a valid path (cache_dir="abc"): keep whatever it creates out of the repo."""
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------ valid arguments
SAMPLED = ("metric", "four_point", "ntk", "ntk_variance")  # what compare samples
X = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.7]])


def _synthetic_ensemble(net, x, M, rng):
    """An Ensemble with random per-network arrays of the right shapes (the estimators only read them)."""
    L, N = net.depth, x.shape[0]
    shapes = {"zz": (L, N, N), "zzzz": (L,) + (N,) * 4, "zz_zz": (L,) + (N,) * 4, "H": (N, N)}
    shapes.update({name: (N,) * 4 for name in ("HH", "H_H", "HoffHoff", "Hzz", "H_zz", "Hoff_zz")})
    stats = {name: rng.normal(size=(M,) + shape) for name, shape in shapes.items()}
    return em.Ensemble(stats=stats, x=x, net=net, seed=0, fold=(), statistics=em.STATISTICS, method="weights",
                       dtype="float64")


def _synthetic_theory(net, N, rng):
    """A FiniteWidth of the right shapes for ``net`` on N inputs (the comparisons only read its arrays)."""
    L = net.depth
    two, four = (L, N, N), (L,) + (N,) * 4
    arrays = {name: rng.normal(size=two) for name in ("K", "Theta", "G1", "H1")}
    arrays.update({name: rng.normal(size=four) for name in ("V", "A", "B", "D", "F")})
    return et.FiniteWidth(net=net, **{k: jnp.asarray(v) for k, v in arrays.items()})


@pytest.fixture(scope="module")
def valid():
    """Valid arguments for every entry point this file knows.  Few distinct shapes, so few compilations:
    one sampled sweep (shared with ``compare``), synthetic ensembles and theory for the estimators."""
    rng = np.random.default_rng(0)
    net = et.MLP(2, 3, "relu", C_W=2.0, C_b=0.1, output_width=2)
    key = jax.random.PRNGKey(0)
    params = em.init_params(net, key, X.shape[1])
    sweep = em.sample(net, X, [3], 4, 0, statistics=SAMPLED, dtype="float32", progress=False)
    ens = _synthetic_ensemble(net, X, 5, rng)
    fw = _synthetic_theory(net, X.shape[0], rng)
    widths = np.array([8.0, 16.0, 32.0])
    values = np.array([1.2, 1.1, 1.05])
    stderrs = np.array([0.01, 0.01, 0.01])
    fit = em.width_sweep_fit(widths, values, stderrs, 1.0, 1.6)

    def apply_fn(p, x):
        return em.apply(net, p, x)

    pnv = rng.normal(size=(5, 2))
    # name -> (callable, positional names, kwargs)
    return {
        "MLP": (et.MLP, dict(depth=2, width=3, activation="tanh", C_W=1.0, C_b=0.1, lambda_W=None, lambda_b=None,
                             output_width=1)),
        "Activation": (et.Activation, dict(name="f", fn=jnp.tanh, nngp=None, dnngp=None, smooth=True)),
        "get_activation": (et.get_activation, dict(activation="tanh", name="activation")),
        "infinite_width": (et.infinite_width, dict(net=net, x=X)),
        "finite_width": (et.finite_width, dict(net=net, x=X[:1], memory=None, store=None)),
        "finite_width_diagonal": (et.finite_width_diagonal, dict(net=net, x=X[:1])),
        "critical_init": (et.critical_init, dict(activation="tanh")),
        "chi_parallel": (et.chi_parallel, dict(activation="tanh", K=0.5, C_W=1.0)),
        "chi_perp": (et.chi_perp, dict(activation="tanh", K=0.5, C_W=1.0)),
        "fixed_point": (et.fixed_point, dict(activation="tanh", C_W=1.5, C_b=0.1, K0=1.0)),
        "FiniteWidth.at_width": (fw.at_width, dict(n=10)),
        "MLP.with_width": (net.with_width, dict(width=5)),
        "MLP.layer_widths": (net.layer_widths, dict(input_dim=3)),
        "init_params": (em.init_params, dict(net=net, key=key, input_dim=3, dtype="float32")),
        "apply": (em.apply, dict(net=net, params=params, x=X)),
        "apply_all": (em.apply_all, dict(net=net, params=params, x=X)),
        "ntk": (em.ntk, dict(net=net, params=params, x=X, output=1)),
        "ntk_full": (em.ntk_full, dict(net=net, params=params, x=X)),
        "ntk_autodiff": (em.ntk_autodiff, dict(apply_fn=apply_fn, params=params, x=X,
                                               learning_rates=em.learning_rates(net, 3), output=0)),
        "learning_rates": (em.learning_rates, dict(net=net, input_dim=3)),
        "default_chunk": (em.default_chunk, dict(net=net, N=2, n0=3, statistics=("metric",), method="weights",
                                                 dtype="float64")),
        # the sweep's own settings, so that no call compiles anything new
        "sample_ensemble": (em.sample_ensemble, dict(net=net, x=X, n_networks=4, seed=1, statistics=SAMPLED,
                                                     method="weights", chunk=None, dtype="float32", progress=False,
                                                     cache_dir=None)),
        "sample": (em.sample, dict(net=net, x=X, widths=[3], n_networks=4, seed=1, statistics=SAMPLED,
                                   method="weights", chunk=None, dtype="float32", progress=False, cache_dir=None)),
        "mean_and_stderr": (em.mean_and_stderr, dict(per_network_values=pnv)),
        "jackknife": (em.jackknife, dict(f=lambda a: a * a, per_network_values=pnv)),
        "metric": (em.metric, dict(ensemble=ens)),
        "four_point": (em.four_point, dict(ensemble=ens)),
        "four_point_same_neuron": (em.four_point_same_neuron, dict(ensemble=ens)),
        "fourth_moment_ratio": (em.fourth_moment_ratio, dict(ensemble=ens)),
        "ntk_mean": (em.ntk_mean, dict(ensemble=ens)),
        "ntk_variance": (em.ntk_variance, dict(ensemble=ens)),
        "ntk_preactivation": (em.ntk_preactivation, dict(ensemble=ens)),
        "width_sweep_fit": (em.width_sweep_fit, dict(widths=widths, values=values, stderrs=stderrs, infinite=1.0,
                                                     first_order=1.6, order=2)),
        "residual_scaling": (em.residual_scaling, dict(widths=widths, values=values, stderrs=stderrs, a_pred=1.0,
                                                       c1_pred=1.6)),
        "agrees": (em.agrees, dict(fit=fit, a_pred=1.0, c1_pred=1.6, nsigma=3.0, slope_tolerance=0.3)),
        "Sweep.estimate": (sweep.estimate, dict(estimator=em.metric)),
        "default_inputs": (cmp.default_inputs, dict(n_inputs=2, input_dim=4, seed=0, correlation=0.5)),
        "metric_comparison": (cmp.metric_comparison, dict(sweep=sweep, theory=fw)),
        "four_point_comparison": (cmp.four_point_comparison, dict(sweep=sweep, theory=fw)),
        "ntk_mean_comparison": (cmp.ntk_mean_comparison, dict(sweep=sweep, theory=fw)),
        "ntk_variance_comparison": (cmp.ntk_variance_comparison, dict(sweep=sweep, theory=fw)),
        "four_point_depth": (cmp.four_point_depth, dict(sweep=sweep, theory=fw, input=1)),
        "compare": (cmp.compare, dict(net=net, x=X, widths=[3], n_networks=4, seed=0, dtype="float32",
                                      cache_dir=None, progress=False, log=None, config_extra=None, theory=fw,
                                      chunk=None)),
        "compare_ntk_depth": (cmp.compare_ntk_depth, dict(net=net, x=X, depths=[2], widths=[3], n_networks=4,
                                                          seed=0, input=0, dtype="float32", progress=False,
                                                          theory=fw)),
    }


# Arguments that accept anything by design (labels, flags, callbacks, free-form metadata).
FREE = {
    ("get_activation", "name"), ("Activation", "name"),
    ("sample_ensemble", "progress"), ("sample", "progress"), ("compare", "progress"), ("compare_ntk_depth", "progress"),
}
# Valid but slow: fixed_point(C_W=1e308) scans the flow of K over ten decades, one quadrature rule per decade.
# compare(theory=None) computes the first-order theory itself (valid, one more compilation).
SLOW = {("fixed_point", "C_W", "huge float"), ("compare", "theory", "None")}
# Per-network values may hold NaN by design (statistics undefined at a one-neuron layer): it propagates.
NAN_PROPAGATES = {("mean_and_stderr", "per_network_values"), ("jackknife", "per_network_values")}
# Arguments whose errors may name another argument (the malformed value is caught as an inconsistency there).
ALIASES = {
    ("jackknife", "per_network_values"): ("per_network_values",),
    ("Sweep.estimate", "estimator"): ("estimator", "ensemble"),
    ("ntk_autodiff", "apply_fn"): ("apply_fn", "params"),
    ("ntk_autodiff", "params"): ("params", "apply_fn"),
    ("compare", "theory"): ("theory", "net"),
    ("compare_ntk_depth", "theory"): ("theory", "net"),
}

# Entry points of the public modules that are result containers (frozen dataclasses and pytrees that the
# library builds and JAX unflattens), not places where user input enters.
RESULT_TYPES = {
    "InfiniteWidth", "FiniteWidth", "FiniteWidthDiagonal", "Prediction", "Criticality", "Ensemble", "Sweep",
    "Estimate", "NTKVariance", "NTKPreactivation", "WidthFit", "Row", "Fit", "StatisticComparison",
    "DepthProfile", "Report", "CacheMismatchError",
}


# The public callables when this file was written (they all have valid arguments in ``valid``).
KNOWN = {
    "MLP", "Activation", "get_activation", "infinite_width", "finite_width", "finite_width_diagonal", "critical_init",
    "chi_parallel", "chi_perp", "fixed_point", "init_params", "apply", "apply_all", "ntk", "ntk_full",
    "ntk_autodiff", "learning_rates", "default_chunk", "sample_ensemble", "sample", "mean_and_stderr", "jackknife",
    "metric", "four_point", "four_point_same_neuron", "fourth_moment_ratio", "ntk_mean", "ntk_variance",
    "ntk_preactivation", "width_sweep_fit", "residual_scaling", "agrees", "default_inputs", "metric_comparison",
    "four_point_comparison", "ntk_mean_comparison", "ntk_variance_comparison", "four_point_depth", "compare",
    "compare_ntk_depth",
}


def _public_callables():
    mods = [et, em, cmp]
    try:
        mods.append(importlib.import_module("efftheory.predict"))
    except ModuleNotFoundError:
        pass
    out = {}
    for mod in mods:
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if callable(obj) and name not in RESULT_TYPES and name != "versions":
                out[f"{mod.__name__}.{name}"] = obj
    return out


def _names(message: str, names) -> bool:
    """Does the message name one of ``names`` as an argument (``name:``, ``name[``, ``name=``, ``'name'``...)?"""
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?=[:\[=' `,]|$)", message) for n in names)


def _call(fn, kwargs):
    """Call with the positional-or-keyword arguments by keyword and *args expanded."""
    sig = inspect.signature(fn)
    pos, kw = [], {}
    for p in sig.parameters.values():
        if p.name not in kwargs:
            continue
        v = kwargs[p.name]
        if p.kind is p.VAR_POSITIONAL:
            pos.extend(v if isinstance(v, tuple) else (v,))
        elif p.kind is p.POSITIONAL_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and any(
                q.kind is q.VAR_POSITIONAL for q in sig.parameters.values())):
            pos.append(v)
        else:
            kw[p.name] = v
    return fn(*pos, **kw)


def _check_outcome(label, fn, kwargs, arg, bad_name, failures):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _call(fn, kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        names = ALIASES.get((label, arg), (arg,))
        if not _names(msg, names):
            failures.append(f"{label}({arg}={bad_name}): {type(e).__name__} does not name {names}: {msg[:200]}")
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        failures.append(f"{label}({arg}={bad_name}): undocumented {type(e).__name__}: {str(e)[:200]}")
        return
    if bad_name in NONFINITE and (label, arg) not in FREE | NAN_PROPAGATES:
        failures.append(f"{label}({arg}={bad_name}): accepted a non-finite value, returned {type(out).__name__}")


def test_every_public_callable_is_fuzzed(valid):
    """The table of valid arguments covers every public callable of the modules it was written for; anything
    public added since (e.g. efftheory.predict) still gets the generic check below."""
    covered = {label.split(".")[-1] for label in valid} | {label.split(".")[0] for label in valid}
    public = {label.rsplit(".", 1)[1] for label in _public_callables()}
    missing = sorted((KNOWN & public) - covered)
    assert not missing, f"public callables without valid arguments in test_fuzz.py: {missing}"
    gone = sorted(KNOWN - public)
    assert not gone, f"no longer public (update KNOWN in test_fuzz.py): {gone}"


@pytest.mark.parametrize("label", [
    "MLP", "Activation", "get_activation", "infinite_width", "finite_width", "finite_width_diagonal",
    "critical_init", "chi_parallel", "chi_perp", "fixed_point", "FiniteWidth.at_width", "MLP.with_width",
    "MLP.layer_widths",
])
def test_theory_entry_points(valid, label):
    _fuzz(valid, label)


@pytest.mark.parametrize("label", [
    "init_params", "apply", "apply_all", "ntk", "ntk_full", "ntk_autodiff", "learning_rates", "default_chunk",
    "sample_ensemble", "sample", "mean_and_stderr", "jackknife", "metric", "four_point", "four_point_same_neuron",
    "fourth_moment_ratio", "ntk_mean", "ntk_variance", "ntk_preactivation", "width_sweep_fit", "residual_scaling",
    "agrees", "Sweep.estimate",
])
def test_empirical_entry_points(valid, label):
    _fuzz(valid, label)


@pytest.mark.parametrize("label", [
    "default_inputs", "metric_comparison", "four_point_comparison", "ntk_mean_comparison",
    "ntk_variance_comparison", "four_point_depth", "compare", "compare_ntk_depth",
])
def test_compare_entry_points(valid, label):
    _fuzz(valid, label)


def _fuzz(valid, label):
    fn, base = valid[label]
    # the valid call itself works
    _call(fn, base)
    failures = []
    for arg in base:
        for bad_name, bad in MALFORMED.items():
            if (label, arg, bad_name) in SLOW:
                continue
            _check_outcome(label, fn, {**base, arg: bad}, arg, bad_name, failures)
    assert not failures, "\n".join(failures)


def test_generic_check_of_every_public_callable():
    """All required arguments malformed at once: a documented error naming one of the arguments."""
    failures = []
    for label, fn in _public_callables().items():
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue
        required = [p for p in sig.parameters.values()
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not required:
            continue
        names = [p.name for p in sig.parameters.values()]
        for bad_name in ("None", "str", "nan", "negative", "empty 2-d", "rank 4", "huge int"):
            kwargs = {p.name: MALFORMED[bad_name] for p in required}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _call(fn, kwargs)
            except (ValueError, TypeError) as e:
                if not _names(str(e), names):
                    failures.append(f"{label}(all={bad_name}): {type(e).__name__} names none of {names}: "
                                    f"{str(e)[:200]}")
            except Exception as e:  # noqa: BLE001 - any other exception type is the finding
                failures.append(f"{label}(all={bad_name}): undocumented {type(e).__name__}: {str(e)[:200]}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------ the command line
# Strings no option should accept (with the baseline otherwise valid): not numbers, not finite, negative,
# beyond every limit, empty, NUL bytes, malformed lists.
BAD_STRINGS = ["", " ", "abc", "nan", "inf", "-inf", "1e999", "-1", "-0.5", "1,,2", "0x10", "\x00", "1;2", "--",
               "2.5.1"]
# Huge but finite: beyond every integer limit, a legitimate (if extreme) variance.  Accepted or refused, never
# a crash: a refusal after the run started may follow its progress lines, but is one error line, no traceback.
HUGE = "99999999999999999999999"
# Valid, fast command lines of the subcommands this file knows; others get the option-alone check.
BASELINES = {
    "compare": ["compare", "--activation", "relu", "--depth", "2", "--widths", "3", "--networks", "2",
                "--no-progress", "--out", "{tmp}/out"],
    "kernels": ["kernels", "--activation", "relu", "--depth", "2"],
    "criticality": ["criticality", "--activation", "relu"],
}
PATH_OPTIONS = ("--out", "--cache", "--inputs-file")


def _subcommands():
    parser = cli._parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(sub):
    """(option string, takes a value) for every optional argument of a subparser except --help."""
    out = []
    for action in sub._actions:
        if not action.option_strings or action.dest == "help":
            continue
        out.append((action.option_strings[0], action.nargs != 0))
    return out


def _one_line_exit_2(argv, capsys, *, may_accept=False):
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    problems = []
    if "Traceback" in captured.err + captured.out:
        problems.append("a traceback")
    if may_accept and code == 0:
        return problems
    if code != 2:
        problems.append(f"exit status {code}")
    errors = [ln for ln in err if ln.startswith("efftheory: error:")]
    if may_accept:
        ok = len(errors) == 1 and err[-1] == errors[0] and not any("Warning" in ln for ln in err)
    else:
        ok = len(err) == 1 and len(errors) == 1
    if not ok:
        problems.append(f"stderr {captured.err[-300:]!r}")
    return problems


def _with(argv, option, value):
    argv = list(argv)
    if option in argv:
        i = argv.index(option)
        if value is None:
            return argv
        argv[i + 1] = value
        return argv
    return argv + ([option] if value is None else [option, value])


def test_cli_malformed_option_values(tmp_path, capsys):
    """Every option of every subcommand, one malformed value at a time: exit 2, one line, no traceback."""
    failures = []
    for name, sub in _subcommands().items():
        base = [a.replace("{tmp}", str(tmp_path)) for a in BASELINES.get(name, [name])]
        for option, takes_value in _options(sub):
            if not takes_value:
                continue
            for value in BAD_STRINGS + [HUGE]:
                if option in PATH_OPTIONS and value not in ("", " ", "\x00"):
                    continue  # any other string is a legitimate path
                argv = _with(base, option, value)
                problems = _one_line_exit_2(argv, capsys, may_accept=value == HUGE)
                if problems:
                    failures.append(f"{argv}: {', '.join(problems)}")
    assert not failures, "\n".join(failures)


def test_cli_malformed_command_lines(tmp_path, capsys):
    """Unknown subcommands and options, missing values, stray positionals, repeated flags that conflict."""
    failures = []
    subs = list(_subcommands())
    argvs = [[], ["--nope"], ["nope"], ["\x00"], [""], ["--version", "extra"]]
    for name in subs:
        base = [a.replace("{tmp}", str(tmp_path)) for a in BASELINES.get(name, [name])]
        argvs += [[name, "--nope"], base + ["stray"], base + ["--nope", "1"]]
        for option, takes_value in _options(_subcommands()[name]):
            if takes_value:
                argvs.append(base[: base.index(option) + 1] if option in base else [name, option])
    for argv in argvs:
        if argv == ["--version", "extra"]:
            continue  # --version prints and exits 0 before looking further
        problems = _one_line_exit_2(argv, capsys)
        if problems:
            failures.append(f"{argv}: {', '.join(problems)}")
    assert not failures, "\n".join(failures)
