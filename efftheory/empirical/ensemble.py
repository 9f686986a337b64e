r"""Ensembles of finite networks: per-network statistics of M networks at one width or over a width sweep.

Network m (m = 0..M-1) of a run with seed s is drawn from the key ``fold_in(PRNGKey(s), m)``; in a
width sweep the networks at hidden width n use ``fold_in(fold_in(PRNGKey(s), n), m)`` so that
different widths are independent samples (the weighted fit of :mod:`.sweep` assumes it).  A chunk of
networks is drawn at once (``jax.vmap`` over keys, one jitted function per shape), chunks run in a
Python loop so that memory stays bounded, and the last chunk is padded with extra networks that are
dropped, so the results do not depend on the chunk size, up to rounding: XLA may pick other kernels for
other batch sizes (measured: chunks of 400 against 25 differ by a few tens of ulp per network, in float32
and float64).  A cache is reused only at the same chunk size, so a resumed run is bit-identical.

Devices.  Each chunk is sharded over ``devices`` (default: every device ``jax.devices()`` lists) along
the network axis with ``jax.sharding``: a 1-d :class:`~jax.sharding.Mesh` named "networks", the chunk
function jitted with the network axis of every output split over it (``NamedSharding(mesh,
P("networks"))``) and the inputs replicated.  ``chunk`` is then the number of networks *per device*:
one step draws the networks start .. start + D chunk - 1 on D devices, device i the block of ``chunk``
networks starting at start + i chunk, with the keys above (they do not depend on the device count), and
the networks past M are dropped.  With the same ``chunk`` each device runs exactly the one-device
program, so results are bit-identical to one device seed for seed (tests/test_sharding.py, four CPU
devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=4``), and cached chunks (one file per
device block) are shared between device counts.  The default chunk is capped at ceil(M / D) so that
small ensembles still use every device; with that cap results agree with one device up to rounding.

Several processes (:mod:`efftheory.distributed`; ``efftheory launch``): each process runs every
P-th step of networks still to be drawn, on its own devices (``jax.local_devices()``: the default mesh
never spans processes), and the finished steps are exchanged through the coordinator's key-value
store, so that every process returns the whole ensemble, bit-identical to one process with the same
``chunk`` (the keys depend only on the network index).  Only process 0 reads and writes ``cache_dir``
(it need not be on a shared filesystem): it writes its own steps as they finish and the other
processes' steps once they are gathered, at the end of each width.

Two ways to draw a network (``method``):

* ``"weights"`` (default): W, b from :func:`.networks.init_params`, forward pass, and for NTK
  statistics the exact NTK of :mod:`.tangent`.
* ``"conditional"``: preactivations at the N inputs from their exact layer-by-layer conditional law
  (:func:`.networks.conditional_forward`), O(N n) per layer instead of O(n^2).  Equal in law to
  "weights" (but other draws); forward statistics only ("metric", "four_point").

Per-network arrays are those of :mod:`.moments`; estimators with standard errors over networks are in
:mod:`.statistics`.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

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
from . import moments
from .networks import check_dtype, check_net, check_x, conditional_forward, forward, init_layers
from .tangent import backward_vectors, ntk_from_layers

__all__ = ["Ensemble", "Sweep", "sample", "sample_ensemble", "default_chunk", "network_mesh"]

_METHODS = ("weights", "conditional")
_CHUNK_BUDGET_BYTES = 128 * 2**20
_MAX_CHUNK = 1024


@result(meta=("net", "seed", "fold", "statistics", "method", "dtype"))
class Ensemble:
    """Per-network statistics of M sampled networks of one architecture.

    Attributes:
      stats: dict name -> array (M, ...): the per-network arrays of :mod:`.moments`
        (e.g. ``zz`` (M, L, N, N), ``zz_zz`` (M, L, N, N, N, N), ``H`` (M, N, N)).
      x: the inputs (N, n_0), float64.
      net: the MLP (its hidden widths are the sampled ones).
      seed, fold: network m used the key fold_in(...fold_in(PRNGKey(seed), *fold)..., m).
      statistics: the statistic groups collected; method: "weights" or "conditional";
      dtype: "float32" or "float64", the arithmetic of the sampled networks.
    """

    stats: dict
    x: np.ndarray
    net: MLP
    seed: int
    fold: tuple
    statistics: tuple
    method: str
    dtype: str

    @property
    def n_networks(self) -> int:
        return int(next(iter(self.stats.values())).shape[0])

    def __repr__(self) -> str:
        return (f"Ensemble({self.net!r}, n_networks={self.n_networks}, inputs={self.x.shape}, "
                f"statistics={self.statistics}, method={self.method!r}, dtype={self.dtype!r}, seed={self.seed}"
                + (f", fold={self.fold}" if self.fold else "") + ")")

    @property
    def fan_in(self) -> tuple[int, ...]:
        """(n_0, ..., n_{L-1}): the 1/n_{l-1} that multiplies layer l's first-order statistics."""
        return (int(self.x.shape[1]),) + tuple(self.net.widths[:-1])


@result(meta=("widths",))
class Sweep:
    """Ensembles at several hidden widths: ``sweep[n]`` is the :class:`Ensemble` at width n."""

    ensembles: tuple
    widths: tuple

    def __getitem__(self, width: int) -> Ensemble:
        if width not in self.widths:
            raise KeyError(f"width {width} not in this sweep's widths {self.widths}")
        return self.ensembles[self.widths.index(width)]

    def __len__(self) -> int:
        return len(self.widths)

    def __repr__(self) -> str:
        e = self.ensembles[0]
        return (f"Sweep(widths={self.widths}, n_networks={e.n_networks}, statistics={e.statistics}, "
                f"method={e.method!r}, dtype={e.dtype!r}, seed={e.seed})")

    def estimate(self, estimator: Callable, *args: Any, **kwargs: Any) -> Any:
        """Apply ``estimator(ensemble, ...)`` at every width and stack the results: leading axis = width."""
        if not callable(estimator):
            raise ValueError(f"estimator: expected a callable estimator(ensemble, ...), "
                             f"got {type(estimator).__name__}")
        outs = [estimator(e, *args, **kwargs) for e in self.ensembles]
        return jax.tree_util.tree_map(lambda *v: np.stack([np.asarray(u) for u in v]), *outs)


# --------------------------------------------------------------------------------------- validation
def _check_seed(seed) -> int:
    return _validate.seed("seed", seed)


def _check_method(method, statistics) -> str:
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if method == "conditional" and not set(statistics) <= moments.FORWARD_ONLY:
        raise ValueError(f"method: 'conditional' draws no weights, so it cannot take NTK statistics "
                         f"{sorted(set(statistics) - moments.FORWARD_ONLY)}; use method='weights'")
    return method


def _per_network_bytes(net: MLP, N: int, n0: int, statistics, method, itemsize: int) -> int:
    sizes = (n0,) + net.widths
    acts = N * sum(sizes)
    stats = net.depth * N**4 * (2 if "four_point" in statistics else 0) + 8 * N**4 + net.depth * N * N
    if method == "conditional":
        return itemsize * (4 * acts + 2 * stats)
    k = net.widths[-1] if any(s.startswith("ntk") for s in statistics) else 0
    params = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return itemsize * (3 * params + (4 + 2 * k) * acts + 2 * stats)


def default_chunk(net: MLP, N: int, n0: int, statistics: str | Sequence[str] = ("metric", "four_point"),
                  method: str = "weights", dtype: DTypeLike = jnp.float64) -> int:
    """Networks per chunk so that one chunk's working memory stays near 128 MiB (at most 1024)."""
    check_net(net)
    N = _validate.positive_int("N", N, maximum=_validate.MAX_WIDTH)
    n0 = _validate.positive_int("n0", n0, maximum=_validate.MAX_WIDTH)
    statistics = moments.resolve(statistics)
    method = _check_method(method, statistics)
    itemsize = np.dtype(check_dtype(dtype)).itemsize
    per = _per_network_bytes(net, N, n0, statistics, method, itemsize)
    return int(max(1, min(_MAX_CHUNK, _CHUNK_BUDGET_BYTES // per)))


# --------------------------------------------------------------------------------------- sampling
def network_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 1-d mesh ("networks",) over ``devices`` (default: all of ``jax.devices()``; with several
    processes (:mod:`efftheory.distributed`) this process's ``jax.local_devices()``)."""
    if devices is None:
        devs = jax.local_devices() if _dist.active() else jax.devices()
    else:
        devs = list(devices)
    if not devs or not all(isinstance(d, jax.Device) for d in devs):
        raise ValueError(f"devices: expected a non-empty sequence of jax devices or None, got {devices!r}")
    if len(set(devs)) != len(devs):
        raise ValueError("devices: each device may appear once")
    return Mesh(np.array(devs, dtype=object), ("networks",))


@functools.lru_cache(maxsize=64)
def _chunk_fn(net: MLP, statistics: tuple, method: str, dtype_name: str, chunk: int, mesh: Mesh | None = None):
    """jit(vmap(one network -> its per-network arrays)) for networks start..start+D*chunk-1, the network
    axis split over the D devices of ``mesh`` (device i: start + i*chunk ..)."""
    dtype = jnp.dtype(dtype_name)
    want_ntk = "ntk" in statistics

    def one(key, x):
        if method == "conditional":
            zs = conditional_forward(net, key, x, dtype)
            return moments.layer_moments(zs, statistics)
        params = init_layers(net, key, x.shape[1], dtype)
        inputs, zs = forward(net, params, x)
        out = moments.layer_moments(zs, statistics)
        if want_ntk:
            gs = backward_vectors(net, params, zs, jnp.arange(net.widths[-1]))
            out.update(moments.ntk_moments(ntk_from_layers(net, inputs, gs), zs[-1], statistics))
        return out

    def run(base_key, start, x):
        idx = start + jnp.arange(chunk, dtype=jnp.uint32)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, idx)
        return jax.vmap(one, in_axes=(0, None))(keys, x)

    # On CPU, LLVM's expensive passes double XLA compile time (seconds per width) for no speed-up of
    # this RNG-bound code; other backends keep their defaults.
    opts = {"xla_llvm_disable_expensive_passes": True} if jax.default_backend() == "cpu" else None
    if mesh is None:
        return jax.jit(run, compiler_options=opts)

    def block(base_key, start, x):  # the one-device program on each device's block of networks
        i = jax.lax.axis_index("networks").astype(jnp.uint32)
        return run(base_key, start + i * jnp.uint32(chunk), x)

    P = PartitionSpec
    sharded = shard_map(block, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P("networks"))
    rep = NamedSharding(mesh, P())
    return jax.jit(sharded, in_shardings=(rep, rep, rep), out_shardings=NamedSharding(mesh, P("networks")),
                   compiler_options=opts)


def to_host(a: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one numpy array on this process."""
    if getattr(a, "is_fully_addressable", True):
        return np.asarray(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def _check_memory(net: MLP, x: np.ndarray, method: str, dtype_name: str) -> None:
    """One network's parameters (or, drawn conditionally, its preactivations) must fit in memory."""
    sizes = (x.shape[1],) + net.widths
    if method == "conditional":
        numbers = x.shape[0] * sum(sizes)
    else:
        numbers = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    _validate.memory("net", numbers * np.dtype(dtype_name).itemsize,
                     f"one network of widths {sizes} (inputs first)")


def _activation_fingerprint(fn) -> str:
    """SHA-256 of sigma at fixed probe points (rounded to 1e-6, so that the last bits of a backend's
    transcendental functions do not matter): two callables of one name never share a cache."""
    probe = np.concatenate([np.linspace(-6.0, 6.0, 49), [-1e3, -37.5, -1e-3, 1e-3, 37.5, 1e3]])
    try:
        vals = np.asarray(fn(jnp.asarray(probe, jnp.float64)), np.float64)
    except Exception as e:  # noqa: BLE001 - any failure here is the activation's
        raise ValueError(f"net: its activation cannot be evaluated on a float64 array ({type(e).__name__}: {e})") \
            from None
    rounded = np.round(np.nan_to_num(vals, nan=0.0, posinf=1e300, neginf=-1e300), 6) + 0.0  # -0.0 -> 0.0
    return _io.array_sha256(rounded)


def _config(net: MLP, x: np.ndarray, seed: int, fold: tuple, statistics, method, dtype_name) -> dict:
    """What a cached chunk depends on (not the chunk size nor M: network m's draws depend on neither)."""
    return {
        "net": repr(net), "activation": net.sigma.name,
        "activation_fn": getattr(net.sigma.fn, "__qualname__", type(net.sigma.fn).__name__),
        "activation_values": _activation_fingerprint(net.sigma.fn),
        "x_shape": list(x.shape), "x_sha256": _io.array_sha256(x),
        "seed": seed, "fold": list(fold), "statistics": list(statistics), "method": method,
        "dtype": dtype_name,
    }


def _run(net, x, n_networks, seed, fold, statistics, method, chunk, dtype_name, progress, cache_dir,
         mesh=None) -> Ensemble:
    D = 1 if mesh is None or mesh.size == 1 else mesh.size
    mesh = mesh if D > 1 else None
    fn = _chunk_fn(net, statistics, method, dtype_name, chunk, mesh)
    base = jax.random.PRNGKey(seed)
    for f in fold:
        base = jax.random.fold_in(base, f)
    xd = jnp.asarray(x, dtype_name)
    if mesh is not None:  # host values, replicated by the jitted function on every device (and host)
        base, xd = np.asarray(base), np.asarray(x, dtype_name)
    shapes = jax.eval_shape(fn, base, np.uint32(0), xd)
    names = moments.arrays_for(statistics)
    writer = jax.process_index() == 0
    if cache_dir is not None:
        config = _config(net, x, seed, fold, statistics, method, dtype_name)
        digest = _cache.config_hash(config)
        stem = "w" + "x".join(map(str, net.widths)) + f"_seed{seed}" + "".join(f"_f{f}" for f in fold)

    step = D * chunk
    starts = list(range(0, n_networks, chunk))   # one block per device and step: the cache's unit
    done: dict[int, dict] = {}
    bar = tqdm(total=n_networks, unit="net", desc=f"widths {net.widths}", disable=not progress, delay=1.0,
               leave=False)
    pending = None
    dist = _dist.active()
    mine: set[int] = set()  # blocks this process drew (with several processes)

    def blocks_of(gstart):
        return [(s, min(s + chunk, n_networks)) for s in range(gstart, min(gstart + step, n_networks), chunk)]

    def finish(item):
        gstart, blocks, out = item
        host = {k: to_host(out[k]) for k in names}
        for start, stop in blocks:
            part = {k: host[k][start - gstart: stop - gstart] for k in names}
            if cache_dir is not None and writer:
                _cache.save_chunk(_cache.chunk_path(cache_dir, stem, start, stop), part, config, digest, start,
                                  stop)
            done[start] = part
            mine.add(start)
            bar.update(stop - start)

    try:
        todo = []
        for gstart in range(0, n_networks, step):
            blocks = blocks_of(gstart)
            if cache_dir is not None and writer:  # with several processes only process 0 reads the cache
                hits = {}
                for start, stop in blocks:
                    expected = {k: ((stop - start,) + shapes[k].shape[1:], shapes[k].dtype) for k in names}
                    hits[start] = _cache.load_chunk(_cache.chunk_path(cache_dir, stem, start, stop), digest, start,
                                                    stop, expected)
                if all(h is not None for h in hits.values()):
                    for (start, stop) in blocks:
                        done[start] = hits[start]
                        bar.update(stop - start)
                    continue
            todo.append(gstart)
        if dist:  # process 0's list of steps still to draw; every P-th one is this process's
            tag = _dist.next_tag("sample")
            todo = _dist.my_share(f"{tag}/todo", todo)
        for gstart in todo:
            out = fn(base, np.uint32(gstart), xd)  # dispatched asynchronously
            if pending is not None:
                finish(pending)
            pending = (gstart, blocks_of(gstart), out)
        if pending is not None:
            finish(pending)
            pending = None
        if dist:
            have = done if writer else {s: done[s] for s in mine}  # process 0 also passes on the cached blocks
            for got in _dist.gather(f"{tag}/blocks", have):
                for start, part in got.items():
                    if start not in done:
                        done[start] = part
                        bar.update(next(iter(part.values())).shape[0])
                        if cache_dir is not None and writer:
                            stop = start + next(iter(part.values())).shape[0]
                            _cache.save_chunk(_cache.chunk_path(cache_dir, stem, start, stop), part, config,
                                              digest, start, stop)
    finally:
        bar.close()
    stats = {k: np.concatenate([done[s][k] for s in starts]) for k in names}
    _check_finite(stats, net, dtype_name)
    return Ensemble(stats=stats, x=np.asarray(x, np.float64), net=net, seed=seed, fold=tuple(fold),
                    statistics=statistics, method=method, dtype=dtype_name)


def _kept_bytes(net: MLP, N: int, statistics) -> int:
    """Bytes of per-network statistics an ensemble keeps for one network (float64 on the host)."""
    L = net.depth
    per = {"zz": L * N * N, "zzzz": L * N**4, "zz_zz": L * N**4, "H": N * N}
    return 8 * sum(per.get(a, N**4) for a in moments.arrays_for(statistics))


def _check_resources(nets, N: int, M: int, statistics, cache_dir) -> None:
    """Refuse, before anything is sampled, a run whose kept statistics cannot fit in the memory the
    machine has available (all widths of a sweep are kept at once), or whose chunk files cannot fit
    on the disk of ``cache_dir``; the error gives the numbers.  Chunks already cached count as written."""
    need = sum(_kept_bytes(net, N, statistics) for net in nets) * M
    avail = _validate.available_memory()
    if avail is not None and 2 * need > avail:  # the chunks and their concatenation coexist briefly
        raise ValueError(f"n_networks: {M} networks keep {_validate.format_bytes(need)} of per-network statistics "
                         f"({_validate.format_bytes(need / M)} each; twice that while they are joined), more than the "
                         f"{_validate.format_bytes(avail)} of memory this machine has available; use fewer networks or "
                         "ask for fewer statistic groups")
    if cache_dir is not None:
        try:
            free = shutil.disk_usage(cache_dir).free
        except OSError:
            return
        cached = sum(e.stat().st_size for e in os.scandir(cache_dir) if e.is_file() and e.name.endswith(".npz"))
        if need - cached > free:
            raise ValueError(f"cache_dir: {M} networks write about {_validate.format_bytes(need)} of chunks to "
                             f"{cache_dir!r}, which has {_validate.format_bytes(free)} free; use fewer networks, another "
                             "cache_dir or none")


_STALE_TMP_SECONDS = 600.0  # a temporary file this old is a killed run's leftover (a write takes seconds)


def _check_cache_dir(cache_dir: str) -> str:
    """Make ``cache_dir`` and check, before any sampling, that it is a writable folder; remove the
    ``.tmp-*`` leftovers of killed runs (older than ten minutes: a live run's temporary file is not)."""
    if os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"cache_dir: {cache_dir!r} exists and is not a directory")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-write-test-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"cache_dir: cannot write to {cache_dir!r} ({e.strerror or e})") from None
    now = time.time()
    for e in os.scandir(cache_dir):
        try:
            if e.name.startswith(".tmp-") and e.is_file(follow_symlinks=False) and \
                    now - e.stat(follow_symlinks=False).st_mtime > _STALE_TMP_SECONDS:
                os.remove(e.path)
        except OSError:  # another run removed it first
            pass
    return cache_dir


def _prepare(net, x, n_networks, seed, statistics, method, chunk, dtype, cache_dir, progress):
    check_net(net)
    x = check_x(x)
    M = _validate.positive_int("n_networks", n_networks, maximum=_validate.MAX_NETWORKS)
    seed = _check_seed(seed)
    statistics = moments.resolve(statistics)
    method = _check_method(method, statistics)
    dtype_name = np.dtype(check_dtype(dtype)).name
    if chunk is not None:
        chunk = _validate.positive_int("chunk", chunk)
    cache_dir = _validate.optional_path("cache_dir", cache_dir)
    _validate.flag("progress", progress)
    if cache_dir is not None and _dist.process_index() == 0:  # with several processes, process 0 owns the files
        _check_cache_dir(cache_dir)
    return x, M, seed, statistics, method, chunk, dtype_name, cache_dir


def sample_ensemble(net: MLP, x: ArrayLike, n_networks: int, seed: int, *,
                    statistics: str | Sequence[str] = ("metric", "four_point"), method: str = "weights",
                    chunk: int | None = None, dtype: DTypeLike = jnp.float64, progress: bool = True,
                    cache_dir: str | os.PathLike | None = None,
                    devices: Sequence[jax.Device] | None = None) -> Ensemble:
    """Sample ``n_networks`` networks of the architecture ``net`` and collect per-network statistics.

    Args:
      net: the MLP (its own hidden widths are used).
      x: inputs (N, n_0), finite.
      n_networks: M >= 1 (standard errors need M >= 2).
      seed: non-negative int; network m uses key fold_in(PRNGKey(seed), m).
      statistics: groups from :data:`.moments.STATISTICS` ("metric", "four_point", "ntk",
        "ntk_variance", "ntk_preactivation"); dependencies are added.
      method: "weights" or "conditional" (module docstring).
      chunk: networks per vmapped chunk and device (default: :func:`default_chunk`, capped at
        ceil(M / number of devices)); results do not depend on it (up to rounding, module docstring),
        but cached chunks are reused only with the same chunk size.
      dtype: float32 or float64 arithmetic (draws in that dtype, so the two dtypes draw other networks).
      progress: show a tqdm bar when the run takes more than a second.
      cache_dir: if given, each finished chunk is written there atomically and reused on restart.
      devices: the devices to shard the networks over (default: all of ``jax.devices()``; module
        docstring).  The keys, hence the networks, do not depend on them.

    Returns:
      An :class:`Ensemble`.  Its per-network arrays hold 2 L N^4 numbers per network with
      "four_point" (6 N^4 more with all NTK groups), M times: ask only for the groups you need when M
      or N is large.
    """
    x, M, seed, statistics, method, chunk, dtype_name, cache_dir = _prepare(
        net, x, n_networks, seed, statistics, method, chunk, dtype, cache_dir, progress)
    _check_memory(net, x, method, dtype_name)
    _check_resources([net], x.shape[0], M, statistics, cache_dir)
    mesh = network_mesh(devices)
    return _run(net, x, M, seed, (), statistics, method, _device_chunk(chunk, net, x, M, mesh, statistics, method,
                                                                          dtype_name),
                dtype_name, progress, cache_dir, mesh)


def _check_finite(stats, net, dtype_name) -> None:
    """Refuse statistics that are not finite numbers (sigma returned NaN or inf, or the network's
    values overflowed ``dtype``): an estimator would otherwise average NaN into every result."""
    bad = None
    for k, v in stats.items():
        if k in ("H_H", "HoffHoff", "H_zz", "Hoff_zz") and net.widths[-1] < 2:
            continue  # cross-neuron moments of a one-neuron output layer: NaN by construction
        if k == "zz_zz":  # the same for every one-neuron layer
            v = v[:, [l for l, w in enumerate(net.widths) if w >= 2]]
        per_net = ~np.all(np.isfinite(v.reshape(v.shape[0], -1)), axis=1)
        if per_net.any():
            bad = (k, int(per_net.sum()), int(np.argmax(per_net)), v.shape[0])
            break
    if bad is not None:
        k, count, first, M = bad
        raise ValueError(f"net: {count} of {M} sampled networks (first: network {first}) give non-finite "
                         f"statistics ({k!r}): sigma {net.sigma.name!r} returned NaN or inf, or the preactivations "
                         f"overflowed {dtype_name}; check the activation, or use dtype=float64 or smaller C_W")


def _device_chunk(chunk, net, x, M, mesh, statistics, method, dtype_name) -> int:
    """Networks per device and step: an explicit chunk (at most M), or the memory default capped at
    ceil(M / D) so that every device has work."""
    if chunk is not None:
        return min(chunk, M)
    c = default_chunk(net, x.shape[0], x.shape[1], statistics, method, dtype_name)
    return max(1, min(c, -(-M // mesh.size)))


def sample(net: MLP, x: ArrayLike, widths: int | Sequence[int], n_networks: int, seed: int, *,
           statistics: str | Sequence[str] = ("metric", "four_point"), method: str = "weights",
           chunk: int | None = None, dtype: DTypeLike = jnp.float64, progress: bool = True,
           cache_dir: str | os.PathLike | None = None, devices: Sequence[jax.Device] | None = None) -> Sweep:
    """Sample ``n_networks`` networks at each hidden width in ``widths`` (``net.with_width(n)``).

    Width n's network m uses key fold_in(fold_in(PRNGKey(seed), n), m), so widths are independent
    and each is reproducible on its own.  Other arguments (``devices`` among them: every width is
    sharded over the same devices) as in :func:`sample_ensemble`.

    Returns:
      A :class:`Sweep`; ``sweep[n]`` is the ensemble at width n and ``sweep.estimate(f)`` stacks an
      estimator over widths.
    """
    ws = _validate.widths("widths", widths)
    x, M, seed, statistics, method, chunk, dtype_name, cache_dir = _prepare(
        net, x, n_networks, seed, statistics, method, chunk, dtype, cache_dir, progress)
    for n in ws:
        _check_memory(net.with_width(n), x, method, dtype_name)
    _check_resources([net.with_width(n) for n in ws], x.shape[0], M, statistics, cache_dir)
    mesh = network_mesh(devices)
    ensembles = []
    for n in ws:
        net_n = net.with_width(n)
        c = _device_chunk(chunk, net_n, x, M, mesh, statistics, method, dtype_name)
        ensembles.append(_run(net_n, x, M, seed, (n,), statistics, method, c, dtype_name, progress, cache_dir,
                              mesh))
    return Sweep(ensembles=tuple(ensembles), widths=ws)
