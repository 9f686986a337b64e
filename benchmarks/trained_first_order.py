"""Width sweep of trained ensembles against the first-order mean of efftheory.predict_finite.

    python benchmarks/trained_first_order.py [--activations tanh gelu] [--scale 4] [--out results.json]

Depth-3 tanh and gelu MLPs, 3 training and 2 test inputs, full-batch gradient descent at 0.5 (tanh) and 0.3 (gelu)
of the infinite-width stability bound for 300 steps, float64 (final losses below 1e-4 on every network, below 1e-14 on nearly all: a
residual of 1e-2 on one network of thousands moves the mean by far less than its standard error).
Per network (its own initial NTK H, initial outputs z_0, final test outputs z_T) three estimators:

    frozen  = H_xD H_DD^{-1} y - Pi y                      -> (m_H1 + m_AB)/n         (NTK frozen at H)
    motion  = z_T(x) - [z_0(x) + H_xD H_DD^{-1} (y - z_0(D))] -> (m_dNTK + m_ddNTK)/n  (the NTK's motion)
    total   = frozen + motion                              -> E[z_T(x)] - Pi y

All three are unbiased for their targets: the dropped term z_0(x) - H_xD H_DD^{-1} z_0(D) has mean exactly
zero (odd under the sign flip of the last layer).  Per test input and estimator the width sweep is fitted
by THEORY.md's m(n) = a + c1/n + c2/n^2 (weighted least squares, standard errors over networks) and
a (expected 0) and c1 are compared with the prediction; the residual after the first-order correction
is fitted by a log-log slope where it is resolved.  --scale multiplies every ensemble size.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import numpy as np

import efftheory as et
from efftheory import predict
from efftheory.empirical import train
from efftheory.predict_finite import trained_mean_first_order

X_TRAIN = np.array([[1.0, 0.2, -0.5], [-0.3, 1.1, 0.4], [0.6, -0.8, 0.9]])
Y_TRAIN = np.array([0.8, -0.5, 0.3])
X_TEST = np.array([[0.7, 0.7, 0.0], [-0.9, 0.1, 0.6]])
NETS = {"tanh": dict(activation="tanh", C_W=1.5, C_b=0.1), "gelu": dict(activation="gelu", C_W=2.0, C_b=0.1)}
#: eta as a fraction of the infinite-width stability bound (gelu at 0.5: a few n = 16 networks do not converge)
FRACTION = {"tanh": 0.5, "gelu": 0.3}
WIDTHS = (16, 32, 64, 128, 256)
NETWORKS = (2000, 1000, 500, 250, 120)
STEPS = 300


def setup(activation: str, width: int = 16):
    net = et.MLP(3, width, **NETS[activation])
    kern = predict.train_test_kernels(net, X_TRAIN, X_TEST)
    eta = FRACTION[activation] * predict.stability_bound(kern)
    Pi = kern.Theta_cross @ np.linalg.inv(kern.Theta_train)
    return net, eta, Pi


def estimators(tr, Pi):
    """(M, 3, N_T): frozen, motion, total per network (module docstring)."""
    d = tr.n_train
    H = tr.ntk_start[:, 0, 0]
    G = np.einsum("mxd,mde->mxe", H[:, d:, :d], np.linalg.inv(H[:, :d, :d]))
    y = tr.y_train[:, 0]
    z0D, z0x, zT = tr.f_train[:, 0, :, 0], tr.f_test[:, 0, :, 0], tr.f_test[:, -1, :, 0]
    frozen = G @ y - Pi @ y
    motion = zT - (z0x + np.einsum("mxd,md->mx", G, y[None] - z0D))
    return np.stack([frozen, motion, frozen + motion], axis=1)


def measure(activation: str, widths=WIDTHS, networks=NETWORKS, steps=STEPS, seed=0, log=print):
    """Per width: mean and standard error over networks of the three estimators, (W, 3, N_T) each."""
    net, eta, Pi = setup(activation)
    means, ses, secs = [], [], []
    for n, M in zip(widths, networks):
        t0 = time.time()
        tr = train(net.with_width(n), X_TRAIN, Y_TRAIN, X_TEST, steps=steps, learning_rate=eta, n_networks=M,
                   key=jax.random.fold_in(jax.random.PRNGKey(seed), n), progress=False)
        worst = float(np.max(tr.final_loss))
        assert worst < 1e-4, f"not converged: largest final loss {worst:.3g}"
        e = estimators(tr, Pi)
        means.append(e.mean(0))
        ses.append(e.std(0, ddof=1) / math.sqrt(M))
        secs.append(time.time() - t0)
        log(f"{activation} n={n} M={M} {secs[-1]:.1f}s max loss {worst:.1e}  n*mean {np.round(n * means[-1], 4).tolist()}  "
            f"n*se {np.round(n * ses[-1], 4).tolist()}")
    return np.array(means), np.array(ses), np.array(secs)


def fit(widths, values, stderrs):
    """Weighted least squares a + c1/n + c2/n^2 per entry: (a, c1, c2), their stderrs, chi2/dof."""
    w = np.asarray(widths, np.float64)
    X = np.stack([np.ones_like(w), 1 / w, 1 / w ** 2], axis=1)
    flat_v, flat_s = values.reshape(len(w), -1), stderrs.reshape(len(w), -1)
    beta, se, chi = [], [], []
    for j in range(flat_v.shape[1]):
        wt = 1 / flat_s[:, j] ** 2
        cov = np.linalg.inv(X.T @ (X * wt[:, None]))
        b = cov @ (X.T @ (wt * flat_v[:, j]))
        beta.append(b)
        se.append(np.sqrt(np.diag(cov)))
        chi.append(float(np.sum(wt * (flat_v[:, j] - X @ b) ** 2)) / max(1, len(w) - 3))
    shape = values.shape[1:]
    return (np.array(beta).T.reshape((3,) + shape), np.array(se).T.reshape((3,) + shape),
            np.array(chi).reshape(shape))


def residual_slope(widths, values, stderrs, c1):
    """Log-log slope of |m(n) - c1/n| over the widths where it exceeds twice its stderr (None if < 3)."""
    w = np.asarray(widths, np.float64)
    r = values - c1 / w
    ok = np.abs(r) > 2 * stderrs
    if ok.sum() < 3:
        return None
    x, yv, s = np.log(w[ok]), np.log(np.abs(r[ok])), stderrs[ok] / np.abs(r[ok])
    X = np.stack([np.ones_like(x), x], 1)
    cov = np.linalg.inv(X.T @ (X / s[:, None] ** 2))
    b = cov @ (X.T @ (yv / s ** 2))
    return float(b[1]), float(math.sqrt(cov[1, 1]))


def theory(activation: str, tol: float = 1e-6):
    net, eta, _ = setup(activation)
    pred = trained_mean_first_order(net, X_TRAIN, Y_TRAIN, X_TEST, learning_rate=eta, motion=True, tol=tol)
    return pred, np.stack([pred.frozen[:, 0], pred.motion[:, 0], pred.total[:, 0]])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--activations", nargs="+", default=sorted(NETS))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", True)
    report = {}
    for act in args.activations:
        t0 = time.time()
        pred, c1_theory = theory(act, args.tol)
        t_theory = time.time() - t0
        Ms = [max(10, int(round(m * args.scale))) for m in NETWORKS]
        means, ses, secs = measure(act, WIDTHS, Ms, seed=args.seed)
        (a, c1, c2), (sa, sc1, sc2), chi = fit(WIDTHS, means, ses)
        slopes = [[residual_slope(WIDTHS, means[:, e, x], ses[:, e, x], c1_theory[e, x]) for x in range(2)]
                  for e in range(3)]
        print(f"\n{act}: theory {t_theory:.1f}s, sampling {secs.sum():.1f}s")
        for e, name in enumerate(("frozen (H1+AB)", "motion (dNTK+ddNTK)", "total")):
            for x in range(2):
                print(f"  {name:20s} x{x}: c1 = {c1[e, x]:+.4f} +- {sc1[e, x]:.4f}  theory {c1_theory[e, x]:+.4f}  "
                      f"pull {(c1[e, x] - c1_theory[e, x]) / sc1[e, x]:+.2f}  a pull {a[e, x] / sa[e, x]:+.2f}  "
                      f"chi2/dof {chi[e, x]:.2f}  residual slope {slopes[e][x]}")
        report[act] = dict(widths=list(WIDTHS), networks=Ms, seconds_sampling=secs.tolist(), seconds_theory=t_theory,
                           means=means.tolist(), stderrs=ses.tolist(), a=a.tolist(), a_stderr=sa.tolist(),
                           c1=c1.tolist(), c1_stderr=sc1.tolist(), c1_theory=c1_theory.tolist(),
                           parts=dict(ntk_mean_shift=pred.ntk_mean_shift[:, 0].tolist(),
                                      ntk_fluctuation=pred.ntk_fluctuation[:, 0].tolist(),
                                      dntk=pred.dntk[:, 0].tolist(), ddntk=pred.ddntk[:, 0].tolist()),
                           residual_slopes=slopes, learning_rate=setup(act)[1])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
