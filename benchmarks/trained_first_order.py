"""Width sweep of trained ensembles against the first-order mean of efftheory.predict_finite.

    python benchmarks/trained_first_order.py [--activations tanh gelu] [--scale 4] [--out results.json]
    python benchmarks/trained_first_order.py --split [--scale 1] [--out results.json]    (split ensembles)

Depth-3 tanh and gelu MLPs, 3 training and 2 test inputs, full-batch gradient descent at 0.5 (tanh) and 0.3 (gelu)
of the infinite-width stability bound for 300 steps, float64 (final losses below 1e-4 on every network, below 1e-14 on
nearly all: a
residual of 1e-2 on one network of thousands moves the mean by far less than its standard error).
Per network (its own initial NTK H, initial outputs z_0, final test outputs z_T) three estimators:

    frozen  = H_xD H_DD^{-1} y - Pi y                      -> (m_H1 + m_AB)/n         (NTK frozen at H)
    motion  = z_T(x) - [z_0(x) + H_xD H_DD^{-1} (y - z_0(D))] -> (m_dNTK + m_ddNTK)/n  (the NTK's motion)
    total   = frozen + motion                              -> E[z_T(x)] - Pi y

All three are unbiased for their targets: the dropped term z_0(x) - H_xD H_DD^{-1} z_0(D) has mean exactly
zero (odd under the sign flip of the last layer).  Per test input and estimator the width sweep is fitted
by docs/theory.md's m(n) = a + c1/n + c2/n^2 (weighted least squares, standard errors over networks) and
a (expected 0) and c1 are compared with the prediction; the residual after the first-order correction
is fitted by a log-log slope where it is resolved.  --scale multiplies every ensemble size.

--split (split ensembles): the frozen estimator needs no training, only the initial NTK, and carries the
O(n^{-1/2}) NTK fluctuation (rms ~ 0.43/sqrt(n)); the motion estimator needs trained networks but its rms
is ~1/n.  So the two are measured on two independent ensembles: the frozen part on SPLIT_FROZEN untrained
networks per width, drawn by :func:`conditional_ntk` (exact in law, O(N^2 n) per network and layer instead
of O(n^2)), the motion part on SPLIT_MOTION trained networks (its own initial NTK from the weights), and
E[total] = E[frozen] + E[motion] with the standard errors added in quadrature.  Widths 16..512.
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
from efftheory.empirical import frozen_ntk_estimator, train, trained_mean_estimators
from efftheory.empirical.tangent import _sigma_prime
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


def setup(activation: str, width: int = 16, x_test=X_TEST):
    net = et.MLP(3, width, **NETS[activation])
    kern = predict.train_test_kernels(net, X_TRAIN, x_test)
    eta = FRACTION[activation] * predict.stability_bound(kern)
    Pi = kern.Theta_cross @ np.linalg.inv(kern.Theta_train)
    return net, eta, Pi


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
        e = trained_mean_estimators(tr, Pi)
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


# ------------------------------------------------------------------------------------------ split ensembles
SPLIT_WIDTHS = (16, 32, 64, 128, 256, 512)
#: untrained networks per width for the frozen part (residual ~1/n^2 resolved at n <= 64 needs M ~ n^3)
SPLIT_FROZEN = (200_000, 300_000, 600_000, 40_000, 15_000, 6_000)
#: trained networks per width for the motion part (rms ~1/n: M ~ n^2 for the same resolution of 1/n^2)
SPLIT_MOTION = (20_000, 20_000, 24_000, 3_000, 600, 150)


def _conditional_ntk_one(net, x, key):
    r"""Initial NTK H (N, N) (output 0) of one network at the N inputs x, drawn exactly in law without weights.

    Forward (as efftheory.empirical.networks.conditional_forward): with the thin QR a_{l-1}^T = Q_l R_l of the
    layer input (n_{l-1}, N), W^(l) = W Q_l Q_l^T + W P_l (P_l = 1 - Q_l Q_l^T), and W Q_l = sqrt(c_l) xi_l with
    i.i.d. standard normal xi_l (n_l, r_l), c_l = C_W/n_{l-1}; so z^(l) = b + sqrt(c_l) (xi_l R_l)^T.
    Backward: the NTK needs g^(l-1) = (g^(l) W^(l)) * sigma'(z^(l-1)) (efftheory.empirical.tangent), and

        g W = sqrt(c) (g xi) Q^T + (g Xi) P,

    with Xi an independent i.i.d. N(0, 1) (n_l, n_{l-1}) matrix: W P is independent of W Q, and g depends on
    the weights of the later layers and on z^(l) (i.e. on W Q and b) only.  With the thin QR g^T = Q_g R_g,
    g Xi = R_g^T (Q_g^T Xi) and Q_g^T Xi is i.i.d. standard normal (r_g, n_{l-1}).  Per layer that is
    O(N^2 n) work and O(N n) normal numbers, for the exact joint law of (z^(1..L), H) at these inputs.
    (Other numbers than init_params draws: equal in law to the weight-based networks, not per realization.)
    """
    import jax.numpy as jnp

    N, n0 = x.shape
    sizes = (n0,) + tuple(net.widths)
    L = net.depth
    shapes = ([(sizes[l + 1], min(N, sizes[l])) for l in range(L)] + [(sizes[l + 1],) for l in range(L)]
              + [(min(N, sizes[l + 1]), sizes[l]) for l in range(1, L)])
    counts = [math.prod(sh) for sh in shapes]
    flat = jax.random.normal(key, (sum(counts),), x.dtype)
    off = np.cumsum([0] + counts)
    parts = [flat[o:o + c].reshape(sh) for o, c, sh in zip(off[:-1], counts, shapes)]
    xis, bs, zetas = parts[:L], parts[L:2 * L], parts[2 * L:]
    a, inputs, zs, Qs = x, [], [], []
    for l in range(L):
        Q, R = jnp.linalg.qr(a.T)
        z = jnp.sqrt(net.C_Ws[l] / sizes[l]) * (xis[l] @ R).T + jnp.sqrt(net.C_bs[l]) * bs[l]
        inputs.append(a)
        zs.append(z)
        Qs.append(Q)
        if l + 1 < L:
            a = net.sigma(z)
    g = jnp.zeros((N, sizes[L]), x.dtype).at[:, 0].set(1.0)
    gs = [g]
    for l in range(L - 1, 0, -1):                 # weights W^(l+1), stored at index l: (n_{l+1}, n_l)
        c = jnp.sqrt(net.C_Ws[l] / sizes[l])
        Qg, Rg = jnp.linalg.qr(g.T)
        X = c * (Rg.T @ zetas[l - 1])
        X = X - (X @ Qs[l]) @ Qs[l].T
        g = (c * (g @ xis[l]) @ Qs[l].T + X) * _sigma_prime(net.sigma, zs[l - 1])
        gs.append(g)
    gs = gs[::-1]
    H = 0.0
    for l in range(L):
        H = H + (gs[l] @ gs[l].T) * (net.lambda_bs[l] + (net.lambda_Ws[l] / sizes[l]) * (inputs[l] @ inputs[l].T))
    return H, zs[-1][:, 0]


def _conditional_chunk(net, x, base_key, start, size):
    keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(start + jax.numpy.arange(size))
    return jax.vmap(lambda k: _conditional_ntk_one(net, x, k))(keys)


_conditional_chunk_jit = jax.jit(_conditional_chunk, static_argnums=(0, 4))


def conditional_ntk(net, x, n_networks: int, key, chunk: int = 4000):
    """(H (M, N, N), z^L (M, N)) of M independent networks at inputs x (float64), by _conditional_ntk_one.
    Network m uses fold_in(key, m) whatever the chunk."""
    x = jax.numpy.asarray(x, jax.numpy.float64)
    Hs, zs = [], []
    for s in range(0, n_networks, chunk):
        size = min(chunk, n_networks - s)
        H, z = _conditional_chunk_jit(net, x, key, s, size)
        Hs.append(np.asarray(H))
        zs.append(np.asarray(z))
    return np.concatenate(Hs), np.concatenate(zs)


def measure_split(activation: str, widths=SPLIT_WIDTHS, frozen_networks=SPLIT_FROZEN, motion_networks=SPLIT_MOTION,
                  steps=STEPS, seed=0, log=print, x_test=X_TEST):
    """Per width: mean and stderr of frozen (untrained ensemble), motion (trained ensemble) and total = frozen +
    motion (stderrs in quadrature), (W, 3, N_T) each; plus diagnostics."""
    net, eta, Pi = setup(activation, x_test=x_test)
    x_all = np.concatenate([X_TRAIN, x_test])
    means, ses, info = [], [], []
    for n, Mf, Mm in zip(widths, frozen_networks, motion_networks):
        t0 = time.time()
        H, _ = conditional_ntk(net.with_width(n), x_all, Mf, jax.random.fold_in(jax.random.PRNGKey(seed + 1000), n))
        fr = frozen_ntk_estimator(H, Pi, Y_TRAIN)
        t1 = time.time()
        tr = train(net.with_width(n), X_TRAIN, Y_TRAIN, x_test, steps=steps, learning_rate=eta, n_networks=Mm,
                   key=jax.random.fold_in(jax.random.PRNGKey(seed), n), progress=False)
        mo = trained_mean_estimators(tr, Pi)[:, 1]
        t2 = time.time()
        loss = tr.final_loss
        m = np.stack([fr.mean(0), mo.mean(0)])
        s = np.stack([fr.std(0, ddof=1) / math.sqrt(Mf), mo.std(0, ddof=1) / math.sqrt(Mm)])
        means.append(m)
        ses.append(s)
        info.append(dict(width=n, frozen_networks=Mf, motion_networks=Mm, seconds_frozen=t1 - t0,
                         seconds_motion=t2 - t1, max_final_loss=float(loss.max()),
                         not_converged=int(np.sum(loss > 1e-10)),
                         rms_frozen=fr.std(0).tolist(), rms_motion=mo.std(0).tolist()))
        log(f"{activation} n={n} frozen M={Mf} {t1 - t0:.0f}s, motion M={Mm} {t2 - t1:.0f}s (max loss {loss.max():.1e}, "
            f"{info[-1]['not_converged']} above 1e-10) | n*mean frozen {np.round(n * m[0], 4).tolist()} +- "
            f"{np.round(n * s[0], 4).tolist()}  motion {np.round(n * m[1], 4).tolist()} +- {np.round(n * s[1], 4).tolist()}")
    means, ses = np.array(means), np.array(ses)
    means = np.concatenate([means, means.sum(1, keepdims=True)], 1)
    ses = np.concatenate([ses, np.sqrt((ses ** 2).sum(1, keepdims=True))], 1)
    return means, ses, info


def analyse(widths, means, ses, c1_theory):
    """docs/theory.md's protocol per part (frozen, motion, total) and test input: the fit a + c1/n + c2/n^2 (a free,
    and a = 0 imposed), the residual r(n) = m(n) - c1_theory/n with its stderr and the log-log slope of |r| over
    the widths where it is resolved (> 2 stderr, >= 3 widths)."""
    w = np.asarray(widths, np.float64)
    (a, c1, c2), (sa, sc1, sc2), chi = fit(widths, means, ses)
    X0 = np.stack([1 / w, 1 / w ** 2], 1)
    out = {}
    for e, part in enumerate(("frozen", "motion", "total")):
        for x in range(means.shape[2]):
            v, s = means[:, e, x], ses[:, e, x]
            wt = 1 / s ** 2
            cov0 = np.linalg.inv(X0.T @ (X0 * wt[:, None]))
            b0 = cov0 @ (X0.T @ (wt * v))
            r = v - c1_theory[e, x] / w
            sl = residual_slope(widths, v, s, c1_theory[e, x])
            out[f"{part} x{x}"] = dict(
                c1_theory=float(c1_theory[e, x]), a=float(a[e, x]), a_stderr=float(sa[e, x]),
                c1=float(c1[e, x]), c1_stderr=float(sc1[e, x]), pull=float((c1[e, x] - c1_theory[e, x]) / sc1[e, x]),
                c2=float(c2[e, x]), c2_stderr=float(sc2[e, x]), chi2_dof=float(chi[e, x]),
                c1_a0=float(b0[0]), c1_a0_stderr=float(math.sqrt(cov0[0, 0])),
                pull_a0=float((b0[0] - c1_theory[e, x]) / math.sqrt(cov0[0, 0])),
                c2_a0=float(b0[1]), c2_a0_stderr=float(math.sqrt(cov0[1, 1])),
                residual=r.tolist(), residual_stderr=s.tolist(), residual_sigmas=(r / s).tolist(),
                n2_residual=(w ** 2 * r).tolist(), n2_residual_stderr=(w ** 2 * s).tolist(),
                residual_slope=None if sl is None else sl[0], residual_slope_stderr=None if sl is None else sl[1])
    return out


def split_main(args):
    report = {}
    for act in args.activations:
        t0 = time.time()
        pred, c1_theory = theory(act, args.tol)
        t_theory = time.time() - t0
        print(f"{act}: theory {t_theory:.0f}s, c1 (frozen, motion, total) x test input {np.round(c1_theory, 4).tolist()}",
              flush=True)
        Mf = [max(10, int(round(m * args.scale))) for m in SPLIT_FROZEN]
        Mm = [max(10, int(round(m * args.scale))) for m in SPLIT_MOTION]
        means, ses, info = measure_split(act, SPLIT_WIDTHS, Mf, Mm, seed=args.seed,
                                         log=lambda s: print(s, flush=True))
        res = analyse(SPLIT_WIDTHS, means, ses, c1_theory)
        print(f"\n{act} (split ensembles): theory {t_theory:.0f}s, sampling {time.time() - t0 - t_theory:.0f}s")
        for k, r in res.items():
            sl = "not resolved" if r["residual_slope"] is None else \
                f"{r['residual_slope']:+.2f} +- {r['residual_slope_stderr']:.2f}"
            print(f"  {k:9s}: c1 {r['c1']:+.4f} +- {r['c1_stderr']:.4f} theory {r['c1_theory']:+.4f} pull {r['pull']:+.2f} "
                  f"(a = 0: {r['c1_a0']:+.4f} +- {r['c1_a0_stderr']:.4f}, pull {r['pull_a0']:+.2f}) "
                  f"a/se {r['a'] / r['a_stderr']:+.2f} "
                  f"chi2/dof {r['chi2_dof']:.2f}\n             residual/se {np.round(r['residual_sigmas'], 1).tolist()}  "
                  f"n^2 r {np.round(r['n2_residual'], 2).tolist()} +- {np.round(r['n2_residual_stderr'], 2).tolist()}  "
                  f"slope {sl}", flush=True)
        report[act] = dict(mode="split", widths=list(SPLIT_WIDTHS), frozen_networks=Mf, motion_networks=Mm, steps=STEPS,
                           seed=args.seed, tol=args.tol, seconds_theory=t_theory, info=info, means=means.tolist(),
                           stderrs=ses.tolist(), c1_theory=c1_theory.tolist(), analysis=res,
                           learning_rate=setup(act)[1])
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    return report


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
    ap.add_argument("--split", action="store_true", help="split ensembles (module docstring)")
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", True)
    if args.split:
        split_main(args)
        return
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
