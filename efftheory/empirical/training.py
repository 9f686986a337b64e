r"""Full-batch gradient descent on ensembles of finite networks, with the PDLT learning-rate tensor.

The loss is the MSE of docs/theory.md's conventions on the N_D training inputs (targets y of shape (N_D, k),
k = n_L the output width),

    L(theta) = 1/2 sum_{a in D} sum_i (z_{i;a} - y_{i;a})^2,

and one step of gradient descent moves every parameter with the learning-rate tensor,

    b^(l)_i    <- b^(l)_i    - eta lambda_b^(l)           dL/db^(l)_i
    W^(l)_{ij} <- W^(l)_{ij} - eta (lambda_W^(l)/n_{l-1})  dL/dW^(l)_{ij}.

To first order in eta the outputs then move by exactly the empirical NTK of :mod:`.tangent`
(docs/theory.md, "The network"): z_{i;x} <- z_{i;x} - eta sum_{j, b in D} H_{ij;x b} (z_{j;b} - y_{j;b}) + O(eta^2),
at every input x.  At infinite width H is frozen at its mean Theta and this linear recursion is exact
(PDLT ch. 10); :mod:`efftheory.predict` solves it.

Network m of a run with key ``key`` starts from :func:`.networks.init_params` with the key
``fold_in(key, m)``.  A chunk of networks is trained at once (``jax.vmap`` over the networks, a
``lax.fori_loop`` over the steps, one jitted function per shape); the last chunk is padded with extra
networks that are dropped.  Predictions on the training and test inputs and the loss are recorded at
steps 0, r, 2r, ... and at the last step (r = ``record_every``); the empirical NTK on the training and
test inputs together is recorded at the first and the last step, and the last layer's kernel given
the network's own features at the first.

Devices.  As in :mod:`.ensemble`, the networks are sharded over ``devices`` (default: every device
``jax.devices()`` lists) along a 1-d mesh "networks": init, the gradient-descent segments and the
records are ``shard_map`` s of the one-device chunk programs, so that with D devices one group of D
chunks trains at once, device i the ``chunk`` networks starting at group start + i chunk, with the keys
above (they do not depend on the device count).  Each device runs exactly the one-device program, so a
run with the same ``chunk`` is bit-identical to one device, seed for seed (tests/test_sharding.py), and
cached chunks and checkpoints (one file per device block) are shared between device counts.  Several
processes (:mod:`efftheory.distributed`): as in :mod:`.ensemble`, each process trains every P-th group
still to train on its own devices, the records are exchanged through the coordinator's key-value
store (every process returns the whole, bit-identical, training), and only process 0 reads and
writes the cache: finished chunks of its own groups at once, the others' after the gather, and
checkpoints only of the groups it trains itself (an interrupted multi-process run resumes the other
processes' groups from their start).

With ``cache_dir`` the run is resumable: each finished chunk is written atomically as in
:mod:`.cache` (``train-...`` files), and while a chunk trains its state (parameters and the records
so far) is checkpointed atomically at recorded steps (at most every ``checkpoint_every`` seconds), so
an interrupted run continues from the last checkpointed record.  A resumed run repeats the very same
floating-point operations, so it gives bit-for-bit the results of an uninterrupted one.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike, DTypeLike

from .. import _io, _validate
from .. import distributed as _dist
from .._progress import tqdm
from .._pytree import result
from .._sharding import shard_map
from ..network import MLP
from . import cache as _cache
from .ensemble import network_mesh, to_host
from .networks import check_dtype, check_key, check_net, check_x, forward, init_layers, learning_rates
from .tangent import backward_vectors, ntk_from_layers

__all__ = ["Training", "train", "default_train_chunk"]

_CHUNK_BUDGET_BYTES = 128 * 2**20
_MAX_CHUNK = 1024
_CPU_CACHE_BYTES = 2**20


@result(meta=("net", "learning_rate", "dtype"))
class Training:
    """An ensemble of M networks trained by full-batch gradient descent (module docstring).

    Shapes: M networks, R recorded steps, N_D training and N_T test inputs, k = n_L outputs,
    N = N_D + N_T (training inputs first).

    Attributes:
      steps: (R,) the recorded steps (0 first, the last step last).
      f_train: (M, R, N_D, k) outputs on the training inputs at the recorded steps.
      f_test: (M, R, N_T, k) outputs on the test inputs at the recorded steps.
      loss: (M, R) L = 1/2 sum (z - y)^2 at the recorded steps.
      ntk_start, ntk_end: (M, k, k, N, N) the empirical NTK H_{i1 i2; a1 a2} (learning-rate tensor of
        ``net``) on the training and test inputs at step 0 and at the last step.
      kernel_start: (M, N, N) the last layer's kernel given the network's own features at step 0,
        K^_{a1 a2} = C_b^(L) + (C_W^(L)/n_{L-1}) sigma(z^(L-1)_{a1}) . sigma(z^(L-1)_{a2}): conditional on
        layers 1..L-1, the initial outputs z_{i;a} are exactly Gaussian, N(0, K^), independently for each i.
      x_train (N_D, n_0), y_train (N_D, k), x_test (N_T, n_0): the data, float64.
      net: the trained architecture; learning_rate: eta; dtype: arithmetic of the networks.
    All arrays are float64 numpy arrays (steps: int64).
    """

    steps: np.ndarray
    f_train: np.ndarray
    f_test: np.ndarray
    loss: np.ndarray
    ntk_start: np.ndarray
    ntk_end: np.ndarray
    kernel_start: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    net: MLP
    learning_rate: float
    dtype: str

    @property
    def n_networks(self) -> int:
        return int(self.loss.shape[0])

    @property
    def final_loss(self) -> np.ndarray:
        """(M,) the loss after the last step."""
        return self.loss[:, -1]

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    def ntk_relative_change(self) -> np.ndarray:
        """(M,) per network ||H_end - H_start||_F / ||H_start||_F over all outputs and inputs."""
        d = (self.ntk_end - self.ntk_start).reshape(self.n_networks, -1)
        h = self.ntk_start.reshape(self.n_networks, -1)
        return np.linalg.norm(d, axis=1) / np.linalg.norm(h, axis=1)

    def __repr__(self) -> str:
        return (f"Training({self.net!r}, n_networks={self.n_networks}, steps={int(self.steps[-1])}, "
                f"learning_rate={self.learning_rate:g}, train={self.x_train.shape}, test={self.x_test.shape}, "
                f"dtype={self.dtype!r})")


# --------------------------------------------------------------------------------------- validation
def _targets(y_train, n_train: int, k: int) -> np.ndarray:
    try:
        y = np.asarray(y_train, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"y_train: expected a real array of shape (N_train, output_width), got "
                         f"{type(y_train).__name__}") from None
    if y.ndim == 1 and k == 1:
        y = y[:, None]
    if y.shape != (n_train, k):
        raise ValueError(f"y_train: expected shape (N_train, output_width) = ({n_train}, {k}), got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y_train: contains NaN or infinite entries")
    return y


def _record_steps(steps: int, record_every: int) -> np.ndarray:
    return np.unique(np.concatenate([np.arange(0, steps, record_every), [steps]])).astype(np.int64)


def _key_data(key) -> list:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return [jax.random.key_impl(key).__str__(), np.asarray(jax.random.key_data(key)).tolist()]
    return ["raw", np.asarray(key).tolist()]


def _per_network_bytes(net: MLP, n0: int, N: int, R: int, itemsize: int) -> int:
    sizes = (n0,) + net.widths
    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    k = net.widths[-1]
    acts = N * sum(sizes) * (2 + k)
    records = R * N * k + 2 * k * k * N * N
    return itemsize * (5 * params + 4 * acts + 2 * records)


def default_train_chunk(net: MLP, n0: int, N: int, R: int = 2, dtype: DTypeLike = jnp.float64) -> int:
    """Networks per chunk: working memory near 128 MiB (at most 1024 networks), and on a CPU at most
    about 1 MiB of parameters per chunk.

    Gradient descent on a few inputs is a sequence of skinny matmuls, bound by memory traffic: on a
    CPU a chunk whose weights stay in cache runs several times faster per network than a large
    vmapped chunk (measured: width 512, float32, 0.7 ms per network-step alone, 2-4 ms in chunks of
    2-128), while narrow networks gain from large chunks.
    """
    check_net(net)
    n0 = _validate.positive_int("n0", n0, maximum=_validate.MAX_WIDTH)
    N = _validate.positive_int("N", N)
    R = _validate.positive_int("R", R)
    itemsize = np.dtype(check_dtype(dtype)).itemsize
    c = _CHUNK_BUDGET_BYTES // _per_network_bytes(net, n0, N, R, itemsize)
    if jax.default_backend() == "cpu":
        sizes = (n0,) + net.widths
        params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        c = min(c, _CPU_CACHE_BYTES // (itemsize * params))
    return int(max(1, min(_MAX_CHUNK, c)))


# --------------------------------------------------------------------------------------- compiled pieces
@functools.lru_cache(maxsize=32)
def _fns(net: MLP, n0: int, dtype_name: str, chunk: int, mesh: Mesh | None = None):
    """(init, segment, record) for chunks of ``chunk`` networks, jitted once per shape; with a mesh of D
    devices for D chunks at once, one per device (networks start .. start + D chunk - 1)."""
    dtype = jnp.dtype(dtype_name)
    lrs = learning_rates(net, n0)
    k = net.widths[-1]

    def init(base_key, start):
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, start + jnp.arange(chunk, dtype=jnp.uint32))
        return jax.vmap(lambda key: init_layers(net, key, n0, dtype))(keys)

    def loss_fn(p, x, y):
        z = forward(net, p, x)[1][-1]
        return 0.5 * jnp.sum((z - y) ** 2)

    # Parameters with a zero learning rate never move: they stay out of the loop state, so that
    # neither their gradients nor (by XLA's loop-invariant code motion) the forward pass through
    # frozen layers are recomputed every step.
    lr_leaves, treedef = jax.tree_util.tree_flatten(lrs)
    live = [lr != 0 for lr in lr_leaves]
    live_lrs = [lr for lr, m in zip(lr_leaves, live) if m]

    def merge(moving, frozen):
        it_m, it_f = iter(moving), iter(frozen)
        return jax.tree_util.tree_unflatten(treedef, [next(it_m) if m else next(it_f) for m in live])

    def segment(params, x, y, eta, nsteps):
        def one(p):
            leaves = jax.tree_util.tree_leaves(p)
            moving = [a for a, m in zip(leaves, live) if m]
            frozen = [a for a, m in zip(leaves, live) if not m]
            loss = lambda mv: loss_fn(merge(mv, frozen), x, y)

            def step(_, mv):
                g = jax.grad(loss)(mv)
                return [w - (eta * lr) * gw for w, gw, lr in zip(mv, g, live_lrs)]

            return merge(jax.lax.fori_loop(0, nsteps, step, moving), frozen)

        return jax.vmap(one)(params)

    def record(params, x_all, y, n_train, with_ntk):
        def one(p):
            inputs, zs = forward(net, p, x_all)
            z = zs[-1]
            loss = 0.5 * jnp.sum((z[:n_train] - y) ** 2)
            H = ntk_from_layers(net, inputs, backward_vectors(net, p, zs, jnp.arange(k))) if with_ntk else None
            a = inputs[-1]
            Khat = net.C_bs[-1] + (net.C_Ws[-1] / a.shape[1]) * (a @ a.T) if with_ntk else None
            return z, loss, H, Khat

        return jax.vmap(one)(params)

    # On CPU, LLVM's expensive passes lengthen the compilation of the RNG-bound init (as in .ensemble)
    # for no speed-up; other backends keep their defaults.
    opts = {"xla_llvm_disable_expensive_passes": True} if jax.default_backend() == "cpu" else None
    if mesh is None:
        return (jax.jit(init, compiler_options=opts), jax.jit(segment, static_argnums=4),
                jax.jit(record, static_argnums=(3, 4)))

    # Several devices: each runs the one-device program above on its block of ``chunk`` networks
    # (device i: networks start + i chunk ..), parameters and records split over the mesh's
    # "networks" axis, the data replicated.
    P = PartitionSpec
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("networks"))

    def init_block(base_key, start):
        i = jax.lax.axis_index("networks").astype(jnp.uint32)
        return init(base_key, start + i * jnp.uint32(chunk))

    def sharded_segment(params, x, y, eta, nsteps):
        return shard_map(functools.partial(segment, nsteps=nsteps), mesh=mesh,
                          in_specs=(P("networks"), P(), P(), P()), out_specs=P("networks"))(params, x, y, eta)

    def sharded_record(params, x_all, y, n_train, with_ntk):
        fn = functools.partial(record, n_train=n_train, with_ntk=with_ntk)
        return shard_map(fn, mesh=mesh, in_specs=(P("networks"), P(), P()), out_specs=P("networks"))(
            params, x_all, y)

    sh_init = shard_map(init_block, mesh=mesh, in_specs=(P(), P()), out_specs=P("networks"))
    return (jax.jit(sh_init, in_shardings=(rep, rep), out_shardings=split, compiler_options=opts),
            jax.jit(sharded_segment, static_argnums=4, in_shardings=(split, rep, rep, rep), out_shardings=split),
            jax.jit(sharded_record, static_argnums=(3, 4), in_shardings=(split, rep, rep), out_shardings=split))


# --------------------------------------------------------------------------------------- the run
def _param_arrays(params) -> dict:
    return {f"{name}{l}": layer[name] for l, layer in enumerate(params) for name in ("W", "b")}


def _params_from(arrays: dict, depth: int):
    return tuple({"W": jnp.asarray(arrays[f"W{l}"]), "b": jnp.asarray(arrays[f"b{l}"])} for l in range(depth))


def _run_group(fns, net, base, gstart, blocks, chunk, D, xd_train, yd, xd_all, eta, rec_steps, cache, bar,
               checkpoint_every):
    """Train networks gstart .. gstart + D chunk - 1 (block i, of ``chunk`` networks, on device i); returns
    {start: host records of networks start..stop-1} for the (start, stop) in ``blocks``."""
    init, segment, record = fns
    n_train = xd_train.shape[0]
    R = len(rec_steps)
    k = net.widths[-1]
    N = xd_all.shape[0]
    dt = np.dtype(xd_all.dtype)
    G = D * chunk
    ckpts = {}
    state = None
    if cache is not None:
        cache_dir, stem, config, digest = cache
        pshapes = jax.eval_shape(init, base, np.uint32(0))
        expected = {f"{name}{l}": ((chunk,) + pshapes[l][name].shape[1:], pshapes[l][name].dtype)
                    for l in range(net.depth) for name in ("W", "b")}
        expected.update({"f_all": ((chunk, R, N, k), dt), "loss": ((chunk, R), dt),
                         "ntk_start": ((chunk, k, k, N, N), dt), "kernel_start": ((chunk, N, N), dt),
                         "next_record": ((), np.int64)})
        ckpts = {start: _cache.chunk_path(cache_dir, stem + "-checkpoint", start, start + chunk)
                 for start, _ in blocks}
        parts = [_cache.load_chunk(ckpts[start], digest, start, start + chunk, expected) for start, _ in blocks]
        # resume only if every block of the group stopped at the same record
        if all(p is not None for p in parts) and len({int(p["next_record"]) for p in parts}) == 1:
            state = parts
    if state is not None:
        fresh = None
        if len(blocks) < D:  # blocks past the last network were not saved: any parameters do (dropped)
            fresh = {n: to_host(v) for n, v in _param_arrays(init(base, np.uint32(gstart))).items()}

        def whole(name):
            have = [p[name] for p in state]
            if fresh is not None:
                have.append(fresh[name][len(blocks) * chunk:] if name in fresh else
                            np.repeat(have[0][:1], G - len(blocks) * chunk, axis=0))
            return np.concatenate(have)

        params = _params_from({n: whole(n) for n in state[0] if n[0] in "Wb" and n[1:].isdigit()}, net.depth)
        f_all, loss, H0, K0 = whole("f_all"), whole("loss"), whole("ntk_start"), whole("kernel_start")
        r0 = int(state[0]["next_record"])
        bar.update(int(rec_steps[r0 - 1]) * len(blocks))
    else:
        params = init(base, np.uint32(gstart))
        z, l0, H, Khat = record(params, xd_all, yd, n_train, True)
        f_all = np.full((G, R, N, k), np.nan, dt)
        loss = np.full((G, R), np.nan, dt)
        f_all[:, 0], loss[:, 0], H0, K0 = to_host(z), to_host(l0), to_host(H), to_host(Khat)
        r0 = 1
    last_save = time.monotonic()
    H_end = H0 if R == 1 else None
    for r in range(r0, R):
        n = int(rec_steps[r] - rec_steps[r - 1])
        params = segment(params, xd_train, yd, eta, n)
        final = r == R - 1
        z, lr_, H, _ = record(params, xd_all, yd, n_train, final)
        f_all[:, r], loss[:, r] = to_host(z), to_host(lr_)
        bar.update(n * len(blocks))
        if final:
            H_end = to_host(H)
        elif ckpts and time.monotonic() - last_save >= checkpoint_every:
            arrays = {n_: to_host(v) for n_, v in _param_arrays(params).items()}
            for i, (start, _) in enumerate(blocks):
                sl = slice(i * chunk, (i + 1) * chunk)
                part = {n_: v[sl] for n_, v in arrays.items()}
                part.update(f_all=f_all[sl], loss=loss[sl], ntk_start=H0[sl], kernel_start=K0[sl],
                            next_record=np.asarray(r + 1, np.int64))
                if jax.process_index() == 0:
                    _cache.save_chunk(ckpts[start], part, config, digest, start, start + chunk)
            last_save = time.monotonic()
    out = {}
    for i, (start, stop) in enumerate(blocks):
        sl = slice(i * chunk, i * chunk + stop - start)
        out[start] = {"f_all": f_all[sl], "loss": loss[sl], "ntk_start": H0[sl], "ntk_end": H_end[sl],
                      "kernel_start": K0[sl]}
    return out, ckpts


def _config(net, x_train, y_train, x_test, key, eta, steps, record_every, dtype_name) -> dict:
    """What a cached chunk depends on (not the chunk size nor M: network m's training depends on neither)."""
    return {"kind": "train", "net": repr(net), "activation": net.sigma.name,
            "activation_fn": getattr(net.sigma.fn, "__qualname__", type(net.sigma.fn).__name__),
            "x_train": [list(x_train.shape), _io.array_sha256(x_train)],
            "y_train": [list(y_train.shape), _io.array_sha256(y_train)],
            "x_test": [list(x_test.shape), _io.array_sha256(x_test)], "key": _key_data(key),
            "learning_rate": repr(float(eta)),
            "steps": int(steps), "record_every": int(record_every), "dtype": dtype_name}


def train(net: MLP, x_train: ArrayLike, y_train: ArrayLike, x_test: ArrayLike, *, steps: int, learning_rate: float,
          n_networks: int, key: jax.Array, record_every: int | None = None, chunk: int | None = None,
          dtype: DTypeLike = jnp.float64, cache_dir: str | os.PathLike | None = None, progress: bool = True,
          checkpoint_every: float = 60.0, devices: Sequence[jax.Device] | None = None) -> Training:
    """Train ``n_networks`` independently initialized networks by full-batch gradient descent.

    Args:
      net: the MLP (its own widths; output width k = ``net.output_width``).
      x_train: (N_D, n_0) training inputs; y_train: (N_D, k) targets ((N_D,) when k = 1).
      x_test: (N_T, n_0) test inputs (predictions there are recorded, never trained on).
      steps: number of gradient-descent steps, >= 1.
      learning_rate: eta > 0 (the global factor of the learning-rate tensor; module docstring).
      n_networks: M >= 1.
      key: a jax PRNG key; network m starts from ``init_params(net, fold_in(key, m), n_0, dtype)``.
      record_every: record predictions and loss every this many steps (default: 10 records);
        the step 0 and the last step are always recorded.
      chunk: networks per vmapped chunk and device (default :func:`default_train_chunk`, capped at
        ceil(M / number of devices)).
      dtype: float32 or float64 arithmetic of the networks.
      cache_dir: if given, finished chunks and in-progress checkpoints are written there atomically
        and reused on restart (module docstring).
      progress: a tqdm bar (steps of all chunks) when the run takes more than a second.
      checkpoint_every: seconds between checkpoints of a chunk in training (at recorded steps; 0 means
        every recorded step).
      devices: the devices to shard the networks over (default: all of ``jax.devices()``; module
        docstring).  The keys, hence the networks, do not depend on them.

    Returns:
      A :class:`Training`.
    """
    check_net(net)
    x_train = check_x(x_train, "x_train")
    x_test = check_x(x_test, "x_test")
    if x_test.shape[1] != x_train.shape[1]:
        raise ValueError(f"x_test: expected inputs of dimension n_0 = {x_train.shape[1]} like x_train, got "
                         f"shape {x_test.shape}")
    k = net.widths[-1]
    y = _targets(y_train, x_train.shape[0], k)
    T = _validate.positive_int("steps", steps, maximum=2**31 - 1)
    eta = _validate.real("learning_rate", learning_rate, positive=True)
    M = _validate.positive_int("n_networks", n_networks, maximum=_validate.MAX_NETWORKS)
    key = check_key(key)
    r_every = max(1, math.ceil(T / 10)) if record_every is None else _validate.positive_int("record_every",
                                                                                               record_every)
    dtype_name = np.dtype(check_dtype(dtype)).name
    ckpt_s = _validate.real("checkpoint_every", checkpoint_every, nonnegative=True)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir: expected a path or None, got {type(cache_dir).__name__}")
    n0, n_train = x_train.shape[1], x_train.shape[0]
    x_all = np.concatenate([x_train, x_test])
    R = T // r_every + 2
    N = x_all.shape[0]
    _validate.memory("record_every", 8.0 * M * (R * (N * k + 1) + 2 * k * k * N * N + N * N),
                     f"recording {M} networks' predictions at {R} steps and their NTKs on {N} inputs")
    rec_steps = _record_steps(T, r_every)
    mesh = network_mesh(devices)
    D = mesh.size
    if chunk is None:  # capped at ceil(M / D) so that every device has work
        chunk = max(1, min(default_train_chunk(net, n0, x_all.shape[0], len(rec_steps), dtype_name), -(-M // D)))
    chunk = min(_validate.positive_int("chunk", chunk), M)

    fns = _fns(net, n0, dtype_name, chunk, mesh if D > 1 else None)
    if D > 1:  # host values, replicated by the jitted functions on every device (and host)
        base = np.asarray(key) if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        xd_train, yd, xd_all = (np.asarray(a, dtype_name) for a in (x_train, y, x_all))
        eta_d = np.asarray(eta, dtype_name)
    else:
        base = key
        xd_train, yd, xd_all = (jnp.asarray(a, dtype_name) for a in (x_train, y, x_all))
        eta_d = jnp.asarray(eta, dtype_name)
    cache = None
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        config = _config(net, x_train, y, x_test, key, eta, T, r_every, dtype_name)
        digest = _cache.config_hash(config)
        stem = "train_w" + "x".join(map(str, net.widths)) + "_" + digest[:12]
        cache = (cache_dir, stem, config, digest)
    names = ("f_all", "loss", "ntk_start", "ntk_end", "kernel_start")
    R, dt = len(rec_steps), np.dtype(dtype_name)
    writer = jax.process_index() == 0

    starts = list(range(0, M, chunk))   # one block of networks per device and group: the cache's unit
    done = {}
    dist = _dist.active()
    mine: set[int] = set()  # blocks this process trained (with several processes)
    bar = tqdm(total=T * len(starts), unit="step", desc=f"train widths {net.widths}", disable=not progress,
               delay=1.0, leave=False)

    def blocks_of(gstart):
        return [(s_, min(s_ + chunk, M)) for s_ in range(gstart, min(gstart + D * chunk, M), chunk)]

    def save(start, stop, part):
        _cache.save_chunk(_cache.chunk_path(cache_dir, stem, start, stop), part, config, digest, start, stop)
        _remove(_cache.chunk_path(cache_dir, stem + "-checkpoint", start, start + chunk))

    try:
        todo = []
        for gstart in range(0, M, D * chunk):
            blocks = blocks_of(gstart)
            if cache is not None and writer:  # with several processes only process 0 reads the cache
                hits = {}
                for start, stop in blocks:
                    expected = {"f_all": ((stop - start, R, N, k), dt), "loss": ((stop - start, R), dt),
                                "ntk_start": ((stop - start, k, k, N, N), dt),
                                "ntk_end": ((stop - start, k, k, N, N), dt), "kernel_start": ((stop - start, N, N), dt)}
                    hits[start] = _cache.load_chunk(_cache.chunk_path(cache_dir, stem, start, stop), digest, start,
                                                    stop, expected)
                if all(h is not None for h in hits.values()):
                    for start, _ in blocks:
                        done[start] = hits[start]
                        bar.update(T)
                        _remove(_cache.chunk_path(cache_dir, stem + "-checkpoint", start, start + chunk))
                    continue
            todo.append(gstart)
        if dist:  # process 0's list of groups still to train; every P-th one is this process's
            tag = _dist.next_tag("train")
            todo = _dist.my_share(f"{tag}/todo", todo)
        for gstart in todo:
            blocks = blocks_of(gstart)
            outs, ckpts = _run_group(fns, net, base, gstart, blocks, chunk, D, xd_train, yd, xd_all, eta_d,
                                     rec_steps, cache if writer else None, bar, ckpt_s)
            for start, stop in blocks:
                if cache is not None and writer:
                    save(start, stop, outs[start])
                done[start] = outs[start]
                mine.add(start)
        if dist:
            have = done if writer else {s_: done[s_] for s_ in mine}  # process 0 also passes on cached blocks
            for got in _dist.gather(f"{tag}/blocks", have):
                for start, part in got.items():
                    if start not in done:
                        done[start] = part
                        bar.update(T)
                        if cache is not None and writer:
                            save(start, start + part["loss"].shape[0], part)
    finally:
        bar.close()
    arr = {n: np.concatenate([done[s][n] for s in starts]).astype(np.float64) for n in names}
    return Training(steps=rec_steps, f_train=arr["f_all"][:, :, :n_train], f_test=arr["f_all"][:, :, n_train:],
                    loss=arr["loss"], ntk_start=arr["ntk_start"], ntk_end=arr["ntk_end"],
                    kernel_start=arr["kernel_start"], x_train=x_train,
                    y_train=y, x_test=x_test, net=net, learning_rate=eta, dtype=dtype_name)


def _remove(path) -> None:
    if path is not None and os.path.exists(path):
        os.remove(path)
