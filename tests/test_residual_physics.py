"""Sampled residual MLPs against the infinite-width residual recursion (docs/theory.md, "Residual MLPs"),
by the width-sweep protocol of docs/theory.md (``-m physics``; about a minute on two CPU cores).

tanh and relu at residual criticality, xi^2 + gamma^2 = 1 with gamma^2 in {0.1, 0.5} (C_W = 1 and 2,
C_b = 0: chi_perp = xi^2 + gamma^2 C_W <sigma'^2> = 1 at K -> 0 and for relu at every K), depth 8, three
inputs, widths 64, 128, 256: the mean metric of every layer and the mean NTK of the output, fitted as
a + c1/n, must extrapolate to K and Theta within 4 standard errors, and the sweep must resolve the
intercepts (standard errors of at most 2% of the kernel's scale in hidden layers, 6% for the output
layer's single neuron).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import efftheory
from efftheory import empirical as E

X3 = np.array([[1.0, 0.3, -0.5, 0.2], [0.1, -1.0, 0.4, 0.6], [0.7, 0.7, 0.0, -0.3]])
WIDTHS = (64, 128, 256)
NETWORKS = 1200
CASES = [(act, g2) for act in ("tanh", "relu") for g2 in (0.1, 0.5)]
C_W = {"tanh": 1.0, "relu": 2.0}


def _assert_pulls(name, pulls, max_pull=4.0):
    p = np.asarray(pulls)
    p = p[np.isfinite(p)]
    assert p.size, name
    rms = float(np.sqrt(np.mean(p ** 2)))
    print(f"{name}: max |pull| {np.max(np.abs(p)):.2f}, rms {rms:.2f} over {p.size} entries")  # shown with -s
    assert np.max(np.abs(p)) < max_pull and rms < 2.5, f"{name}: max |pull| {np.max(np.abs(p)):.2f}, rms {rms:.2f}"


@pytest.mark.physics
@pytest.mark.parametrize("act, gamma2", CASES, ids=[f"{a}-gamma2={g}" for a, g in CASES])
def test_residual_ensembles_approach_infinite_width(act, gamma2):
    net = efftheory.MLP(8, 64, act, C_W=C_W[act], C_b=0.0, skip=np.sqrt(1.0 - gamma2), branch=np.sqrt(gamma2))
    inf = efftheory.infinite_width(net, X3)
    sweep = E.sample(net, X3, WIDTHS, NETWORKS, seed=11, statistics=("metric", "ntk"), dtype=jnp.float32,
                     progress=False)
    m, h = sweep.estimate(E.metric), sweep.estimate(E.ntk_mean)
    metric_fit = E.width_sweep_fit(WIDTHS, m.value, m.stderr, infinite=inf.K, order=1)
    ntk_fit = E.width_sweep_fit(WIDTHS, h.value, h.stderr, infinite=inf.Theta[-1], order=1)
    _assert_pulls(f"{act} gamma^2={gamma2} metric a", metric_fit.a_pull)
    _assert_pulls(f"{act} gamma^2={gamma2} ntk_mean a", ntk_fit.a_pull)
    print(f"{act} gamma^2={gamma2}: fitted c1 / K (metric, layer 7, diagonal) "
          f"{np.round(np.diagonal(metric_fit.c1[-2]) / np.diagonal(inf.K[-2]), 3)} +- "
          f"{np.round(np.diagonal(metric_fit.c1_stderr[-2]) / np.diagonal(inf.K[-2]), 3)}; "
          f"c1 / Theta (ntk diagonal) {np.round(np.diagonal(ntk_fit.c1) / np.diagonal(inf.Theta[-1]), 3)} +- "
          f"{np.round(np.diagonal(ntk_fit.c1_stderr) / np.diagonal(inf.Theta[-1]), 3)}")
    # the sweep has the power to tell: the plain MLP's kernels (skip = 0, branch = 1) are rejected
    plain = efftheory.infinite_width(net.replace(skip=0.0, branch=1.0), X3)
    assert np.max(np.abs(E.width_sweep_fit(WIDTHS, h.value, h.stderr, infinite=plain.Theta[-1], order=1).a_pull)) > 10
    # resolved: hidden layers to 2% of their kernel's scale (the output layer has one neuron: 6%)
    scale = np.abs(inf.K).max(axis=(1, 2))[:, None, None]
    assert np.max(metric_fit.a_stderr[:-1] / scale[:-1]) < 0.02
    assert np.max(metric_fit.a_stderr[-1] / scale[-1]) < 0.06
    assert np.max(ntk_fit.a_stderr / np.abs(inf.Theta[-1]).max()) < 0.06
