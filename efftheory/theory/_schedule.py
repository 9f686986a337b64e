"""How finite_width runs its layer recursions: memory plan, on-disk store and resume, sources
computed ahead in threads, cancellation, progress.

:mod:`efftheory.theory.finite` holds the equations (``layer_sources``: the Gaussian integrals of one
layer; ``layer_step``: one step l -> l+1 of the recursions) and the result type; this module decides
how they run:

* memory plan (:func:`plan_memory`): how many sets of inputs one block of Gaussian integrals takes,
  within a budget or the memory the machine has available, or a ValueError with the numbers;
* look-ahead (:class:`Ahead`): the sources of the next ``AHEAD`` layers compute in threads while a
  layer step runs; an interrupted run cancels them (:mod:`efftheory._cancel`) and waits for them;
* store (:func:`config`, :class:`efftheory.theory._store.LayerStore`): each finished layer written to
  disk, a run resumed from its last finished layer, a store of another computation refused;
* progress: a bar over layers;
* several processes (:mod:`efftheory.distributed`): each layer's sets of three and four inputs are
  split over the processes (:class:`efftheory.distributed.Part`) and the values exchanged, so that
  every process holds every layer's sources and runs the same layer steps.  Only process 0 opens the
  store; on a resumed run it passes the finished layers to the others.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import distributed as _dist
from .._cancel import cancel_with
from .._io import array_sha256, text_sha256
from .._precision import enable_x64 as _enable_x64
from ..gaussian import SET_BLOCK, SET_BYTES
from ..network import MLP
from ._store import NAMES as STATE
from ._store import LayerStore

STEP_TENSORS = 20      # (N,)*4 float64 arrays alive at once in layer_step, inputs and outputs included (18 measured)
AHEAD = 2              # layers whose sources finite_width computes ahead, in threads (3 (N,)*4 arrays each;
                        # 1 + AHEAD source computations, each with its block of sets, may run at once)
FLOOR = 64 << 20       # quadrature tables and buffers that do not grow with N
MIN_BLOCK = 64         # fewest sets per quadrature block a memory budget may force


def plan_memory(N: int, L: int, memory, on_disk: bool, available: int | None = None) -> int:
    """Sets per quadrature block within ``memory`` bytes, or, when ``memory`` is None, within the
    memory the machine has available now (``available``; default: :func:`_validate.available_memory`);
    raises ValueError, with the numbers and the remedy, if the held tensors and one layer step alone
    exceed it."""
    from .. import _validate

    t4 = 8.0 * N**4
    held = 0.0 if on_disk else 6.0 * L * t4  # five (L, N,N,N,N) results and one converted copy
    fixed = held + (STEP_TENSORS + 3 * AHEAD) * t4 + FLOOR
    per_set = (1 + AHEAD) * SET_BYTES  # every source computation in flight holds a block
    budget = memory if memory is not None else (_validate.available_memory() if available is None else available)
    if budget is None:
        return SET_BLOCK
    block = int(min(SET_BLOCK, (budget - fixed) // per_set)) if budget > fixed else 0
    if block < MIN_BLOCK:
        need = fixed + MIN_BLOCK * per_set
        hint = "" if on_disk else (f"; {_validate.format_bytes(held)} of it holds the returned tensors: "
                                   "give store=<directory> to keep them on disk")
        if memory is not None:
            raise ValueError(f"memory: {_validate.format_bytes(memory)} is below the {_validate.format_bytes(need)} that "
                             f"N = {N}, depth {L} needs ({_validate.format_bytes(STEP_TENSORS * t4)} for one layer step"
                             f"{hint})")
        raise ValueError(f"x: N = {N} inputs at depth {L} need {_validate.format_bytes(need)} of memory "
                         f"({_validate.format_bytes(STEP_TENSORS * t4)} for one layer step{hint}), more than the "
                         f"{_validate.format_bytes(budget)} this machine has available; fewer inputs"
                         f"{'' if on_disk else ', store=<directory>'} or a machine with more memory would fit")
    return block


class Ahead:
    """fn() computed in a thread: finite_width computes the sources of the next AHEAD layers while a
    layer step runs, so that one layer's host work (rules, items, the N^4 algebra) overlaps
    another's kernels, and on one JAX device two kernels run at once.  :meth:`cancel` stops it at
    its next kernel call (:func:`efftheory._cancel.check_stop`) and waits for it (about a second),
    so that an interrupted finite_width leaves no thread running: measured, a daemon thread here
    made Ctrl-C end in "terminate called ... exception not rethrown" at interpreter exit."""

    def __init__(self, fn):
        self._out = None
        self._stop = threading.Event()
        self._x64 = bool(jax.config.jax_enable_x64)  # config contexts are thread-local: the caller's, in the thread
        self._thread = threading.Thread(target=self._run, args=(fn,), name="efftheory-sources")
        self._thread.start()

    def _run(self, fn):
        cancel_with(self._stop)  # this thread's context only
        try:
            with _enable_x64(self._x64):
                self._out = (True, fn())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._out = (False, e)

    def cancel(self):
        self._stop.set()
        self._thread.join()

    def result(self):
        self._thread.join()
        ok, value = self._out
        if not ok:
            raise value
        return value


def code_fingerprint(fn) -> str:
    """What a Python function's definition says: its code (nested code objects included), constants,
    defaults and the values its closure captured, without memory addresses, so that two lambdas
    that differ only in a constant (``clip(z, -6, 6)`` and ``clip(z, -8, 8)``) never collide.  A
    callable without Python code (a ufunc, a ``functools.partial``, an instance) gives its type and
    the fingerprints of what it wraps, as far as they can be read."""

    def code(c) -> str:
        consts = [code(k) if hasattr(k, "co_code") else repr(k) for k in c.co_consts]
        return repr((c.co_name, c.co_code.hex(), consts, c.co_names))

    def value(v, depth=0) -> str:
        if depth > 3:
            return type(v).__qualname__
        if hasattr(v, "__code__"):
            cells = [value(cell.cell_contents, depth + 1) for cell in (v.__closure__ or ())
                     if _cell_filled(cell)]
            return repr((getattr(v, "__module__", None), v.__qualname__, code(v.__code__),
                         [value(d, depth + 1) for d in (v.__defaults__ or ())], cells))
        if isinstance(v, functools.partial):
            return repr(("partial", value(v.func, depth + 1), [value(a, depth + 1) for a in v.args],
                         sorted((k, value(a, depth + 1)) for k, a in v.keywords.items())))
        if isinstance(v, (int, float, complex, str, bytes, bool, type(None))):
            return repr(v)
        if isinstance(v, (tuple, list)):
            return repr([value(a, depth + 1) for a in v])
        if isinstance(v, (np.ndarray, jax.Array)):
            a = np.asarray(v)
            return repr((a.dtype.str, a.shape, array_sha256(a)))
        name = f"{type(v).__module__}.{type(v).__qualname__}"
        if callable(v) and hasattr(v, "__name__"):  # a module-level function, a ufunc, a jnp function
            return repr((name, getattr(v, "__module__", None), v.__name__))
        return name

    return text_sha256(value(fn))


def _cell_filled(cell) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # an empty closure cell
        return False
    return True


def config(net: MLP, x: np.ndarray, tol: float, K_max: float | None = None) -> dict:
    """What a store's results depend on (:mod:`._store`): sigma by its definition and its values.

    sigma is sampled on 4001 points spanning 20 standard deviations of the widest kernel the
    computation meets (``K_max``, the largest diagonal of K over the layers; no rule of the
    integrals reaches that far) and on points out to |z| = 1e4, and its code is fingerprinted
    (:func:`code_fingerprint`): two callables of one name that differ anywhere the integrals look,
    or in their definition, give different stores.
    """
    if K_max is None:
        from .infinite import infinite_width

        K_max = float(np.max(np.diagonal(np.asarray(infinite_width(net, x).K), axis1=1, axis2=2)))
    reach = max(8.0, 20.0 * math.sqrt(max(K_max, 0.0)))
    tails = np.logspace(-6.0, 4.0, 81)
    probe = np.concatenate([np.linspace(-reach, reach, 4001), tails, -tails])
    fn = np.asarray(net.sigma.fn(jnp.asarray(probe, jnp.float64)), dtype=np.float64)
    if fn.shape != probe.shape:
        raise ValueError(f"net: the activation returned shape {fn.shape} for {probe.shape} inputs; "
                         "expected an elementwise function")
    from .. import __version__

    return {"net": repr(net), "sigma": array_sha256(fn),
            "sigma_code": code_fingerprint(net.sigma.fn), "smooth": net.sigma.smooth,
            "x": array_sha256(np.asarray(x, np.float64)) + str(x.shape),
            "tol": tol, "efftheory": __version__}


def run_layers(net: MLP, x: np.ndarray, inf, *, tol: float, memory: float | None, store: str | None,
               progress: bool, step: Callable, sources: Callable) -> dict[str, np.ndarray | jax.Array]:
    """Run ``step`` (layer_step) over the layers of ``net`` from the infinite-width kernels ``inf``, with
    each layer's ``sources`` (layer_sources) computed ahead in threads; returns G1, V, H1, A, B, D, F
    (L, ...) by name: jax arrays, or read-only memory maps of ``store`` for the N^4 ones."""
    Ks, Ts = np.asarray(inf.K), np.asarray(inf.Theta)
    L, N = Ks.shape[0], Ks.shape[1]
    block = plan_memory(N, L, memory, store is not None)
    z2, z4 = np.zeros((N, N)), np.zeros((N,) * 4)
    zero = (z2, z4, z2, z4, z4, z4, z4)
    residual = net.residual  # the state carries the three-point tensor P (N, N, N) of residual layers
    names = STATE + (("P", "Oa", "Ob") if residual else ())
    if residual:
        zero = zero + (np.zeros((N,) * 3),) * 3
    dist = _dist.active()
    tag = _dist.next_tag("finite") if dist else ""
    owns_store = store is not None and (not dist or _dist.process_index() == 0)
    if owns_store:
        K_max = float(np.max(np.diagonal(Ks, axis1=1, axis2=2)))
        disk = LayerStore(store, config(net, x, tol, K_max), L, N, names=names)
        if disk.done == 0:
            disk.write(0, zero)
        first = disk.done
        state = disk.layer(first - 1) if first < L else None
        keep = disk.write
    else:
        held = [np.empty((L,) + z.shape) for z in zero]
        first, state = 1, zero

        def keep(l, st):
            for h, a in zip(held, st):
                h[l] = a

        keep(0, zero)
    if dist and store is not None:  # process 0's finished layers, to the others
        done = [disk.layer(l) for l in range(first)] if owns_store else None
        done = _dist.agree(f"{tag}/store", done)
        if not owns_store:
            for l, st in enumerate(done):
                keep(l, st)
            first, state = len(done), (done[-1] if len(done) < L else None)
    ratios = net.width_ratios()
    if residual:  # <sigma' sigma'> of every layer, for the neuron histories of B (finite.neuron_history)
        from .finite import neuron_history, sigma_prime_pairs

        Dds = [sigma_prime_pairs(net.sigma, K) for K in Ks]
    layers = range(first, L)
    if progress:
        from .._progress import tqdm

        layers = tqdm(layers, desc=f"finite_width N={N}", unit="layer", initial=first - 1, total=L - 1)
    ahead = {}  # layer -> its sources, computing in a thread (Ahead)

    def start(l):
        if l < L and l not in ahead:
            part = {"part": _dist.Part(f"{tag}/L{l}")} if dist else {}
            ahead[l] = Ahead(functools.partial(sources, net.sigma, Ks[l - 1], tol=tol, block=block, **part))

    try:
        for l in layers:
            for j in range(l, l + 1 + AHEAD):  # this layer's sources and the next AHEAD layers'
                start(j)
            computed = ahead[l].result()
            del ahead[l]  # after result(): interrupted inside it, it is still cancelled below
            extra = {}
            if residual:
                hist = neuron_history(net.C_Ws, net.skips, net.branches, Ks, Ts, Dds, l)
                extra = dict(skip=net.skips[l], branch=net.branches[l], odd=state[7:], history=hist)
            state = step(net.sigma, net.C_Ws[l], net.lambda_Ws[l], ratios[l - 1], Ks[l - 1], Ts[l - 1],
                         *state[:7], tol=tol, block=block, sources=computed, **extra)
            keep(l, state)
    finally:  # interrupted (or failed): stop the sources still computing before leaving
        for a in ahead.values():
            a.cancel()
        if owns_store:
            disk.close()
    if owns_store:
        out = disk.arrays()
        out["G1"], out["H1"] = jnp.asarray(out["G1"]), jnp.asarray(out["H1"])
    else:
        out = {}
        for name in names:  # one kind at a time: one extra copy at most
            out[name] = jnp.asarray(held.pop(0))
    return out
