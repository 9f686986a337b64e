"""Several processes (one machine or a cluster) on JAX's own multi-process runtime.

Every process runs the same program.  :func:`initialize` starts ``jax.distributed`` (its coordinator
and key-value store); the parallel parts of efftheory then split their independent work items over
the processes and exchange the results through the coordinator's key-value store, so that every
process holds the whole result and continues identically:

* ensemble sampling (:mod:`efftheory.empirical.ensemble`) and training
  (:mod:`efftheory.empirical.training`): each process runs its share of the chunks of networks on
  its own devices (``jax.local_devices()``); network m's key depends only on m, so results are
  bit-identical to one process;
* the finite-width sources (:func:`efftheory.finite_width`): the sets of three and four inputs of
  each layer are split over the processes (:class:`Part`).

Process 0 writes files (caches, stores, reports); the others write nothing.  No XLA collective
runs across processes: only the key-value store, so the same code runs on CPU and GPU hosts.

Configuration (arguments of :func:`initialize`, else the environment):

* ``EFFTHEORY_COORDINATOR`` (host:port of process 0), ``EFFTHEORY_NUM_PROCESSES``,
  ``EFFTHEORY_PROCESS_ID``: set by ``efftheory launch`` or by hand on a cluster;
* under Slurm (``SLURM_JOB_ID`` and ``SLURM_NTASKS`` > 1) and without the variables above, JAX reads
  Slurm's own variables (``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ...);
* ``EFFTHEORY_DISTRIBUTED_TIMEOUT`` (seconds, default 60): a process whose heartbeat (one a second,
  from a thread) stops for this long is reported dead by name (:class:`DistributedError`) in the
  processes that wait on it, instead of a hang.

Importing this module changes nothing in JAX; :func:`initialize` sets the CPU collectives
implementation (gloo) only when it starts the runtime.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["DistributedError", "Part", "initialize", "settings_from_env", "active", "process_index",
           "process_count", "owner", "share", "fetch", "gather", "agree", "barrier", "timeout", "next_tag", "abort",
           "check_alive"]

ENV_COORDINATOR = "EFFTHEORY_COORDINATOR"
ENV_NUM_PROCESSES = "EFFTHEORY_NUM_PROCESSES"
ENV_PROCESS_ID = "EFFTHEORY_PROCESS_ID"
ENV_TIMEOUT = "EFFTHEORY_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
HEARTBEAT_S = 1.0           # a process writes its heartbeat this often
POLL_MS = 1000              # a wait looks at the heartbeats this often
PIECE_BYTES = 16 << 20      # one value is stored in pieces of at most this many bytes
_PREFIX = "efftheory"


class DistributedError(RuntimeError):
    """Another process died, stopped answering or failed; ``process`` is its index (None: unknown)."""

    def __init__(self, message: str, process: int | None = None):
        super().__init__(message)
        self.process = process


# ------------------------------------------------------------------------------------------ settings
def timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds without a heartbeat after which a process is reported dead (``EFFTHEORY_DISTRIBUTED_TIMEOUT``)."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_TIMEOUT)
    if text is None or text.strip() == "":
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}: expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{ENV_TIMEOUT}: expected a positive finite number of seconds, got {text!r}")
    return value


def _int_env(env, name: str, minimum: int) -> int:
    text = env[name]
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def check_address(name: str, address: str) -> str:
    """``host:port`` with a port in 1..65535, or ValueError naming ``name``."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"{name}: expected host:port, got {address!r}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}: expected host:port with a port in 1..65535, got {address!r}")
    return address


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """What :func:`initialize` would start from the environment: ``{"coordinator", "num_processes",
    "process_id"}`` from the EFFTHEORY_* variables, ``{"slurm": True}`` on a Slurm job of several tasks
    (JAX reads Slurm's variables), or None (one process)."""
    env = os.environ if environ is None else environ
    given = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if env.get(n, "").strip()]
    if given:
        missing = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if n not in given]
        if missing:
            raise ValueError(f"{missing[0]}: not set, but {', '.join(given)} {'is' if len(given) == 1 else 'are'}; "
                             "set all three (coordinator host:port, number of processes, this process's id)")
        count = _int_env(env, ENV_NUM_PROCESSES, 1)
        pid = _int_env(env, ENV_PROCESS_ID, 0)
        if pid >= count:
            raise ValueError(f"{ENV_PROCESS_ID}: expected 0..{count - 1} ({ENV_NUM_PROCESSES} = {count}), got {pid}")
        return {"coordinator": check_address(ENV_COORDINATOR, env[ENV_COORDINATOR].strip()),
                "num_processes": count, "process_id": pid}
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS", "1").strip().isdigit() and int(env["SLURM_NTASKS"]) > 1:
        return {"slurm": True}
    return None


# ------------------------------------------------------------------------------------------ runtime
_state: dict[str, Any] = {"client": None, "index": 0, "count": 1, "timeout": DEFAULT_TIMEOUT, "seen": {},
                          "tags": {}, "stop": None}
_lock = threading.Lock()


def active() -> bool:
    """True when this process is one of several started by :func:`initialize` (or by
    ``jax.distributed.initialize`` directly)."""
    _adopt()
    return _state["client"] is not None and _state["count"] > 1


def process_index() -> int:
    _adopt()
    return _state["index"]


def process_count() -> int:
    _adopt()
    return _state["count"]


def _adopt() -> None:
    """Use a runtime started by ``jax.distributed.initialize`` outside :func:`initialize`."""
    if _state["client"] is not None:
        return
    from jax._src import distributed as _jd

    gs = _jd.global_state
    if gs.client is not None and (gs.num_processes or 1) > 1:
        _start(gs.client, gs.process_id, gs.num_processes, timeout())


def _start(client, index: int, count: int, seconds: float) -> None:
    with _lock:
        if _state["client"] is not None:
            return
        _state.update(client=client, index=int(index), count=int(count), timeout=float(seconds), seen={})
        stop = threading.Event()
        _state["stop"] = stop
        _beat(client, index, 0)
        threading.Thread(target=_heartbeat, args=(client, index, stop), name="efftheory-heartbeat",
                         daemon=True).start()


def _beat(client, index: int, n: int) -> None:
    client.key_value_set(f"{_PREFIX}/heartbeat/{index}", str(n), allow_overwrite=True)


def _heartbeat(client, index: int, stop: threading.Event) -> None:
    n = 0
    while not stop.wait(HEARTBEAT_S):
        n += 1
        try:
            _beat(client, index, n)
        except Exception:  # noqa: BLE001 - the coordinator is gone: the waits report it
            return


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               timeout_s: float | None = None) -> bool:
    """Start JAX's multi-process runtime for this process; returns True when several processes run.

    Args:
      coordinator: ``host:port`` of process 0's coordinator (all processes give the same).
      num_processes: number of processes P >= 1.
      process_id: this process's index, 0..P-1.
      timeout_s: seconds without a heartbeat after which a process is reported dead (default
        ``EFFTHEORY_DISTRIBUTED_TIMEOUT`` or 60).

    Without arguments the settings come from the environment (:func:`settings_from_env`); with
    neither (or P = 1) nothing is started and False is returned.  Call it before any other JAX
    work (``efftheory launch`` and the command line do).
    """
    seconds = timeout() if timeout_s is None else float(timeout_s)
    if not seconds > 0:
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    if (coordinator, num_processes, process_id) == (None, None, None):
        settings = settings_from_env()
    else:
        if coordinator is None or num_processes is None or process_id is None:
            raise ValueError("coordinator, num_processes, process_id: give all three or none (then the environment "
                             "is read)")
        check_address("coordinator", coordinator)
        if not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes: expected an integer >= 1, got {num_processes!r}")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id: expected an integer in 0..{num_processes - 1}, got {process_id!r}")
        settings = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if settings is None or settings.get("num_processes") == 1:
        return False
    if active():
        return True
    import jax
    from jax._src import distributed as _jd

    if _backend_started():
        raise RuntimeError("initialize: JAX has already started its backends in this process; call "
                           "efftheory.distributed.initialize() before any other JAX computation")
    try:  # cross-process CPU collectives, should an XLA program ever need them (efftheory's do not)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001 - an older or newer JAX without that option
        pass
    hb = int(max(10, 2 * seconds + 10))  # JAX's own detection comes after ours, whose message names the process
    if settings.get("slurm"):
        jax.distributed.initialize(heartbeat_timeout_seconds=hb, shutdown_timeout_seconds=int(max(5, seconds)))
    else:
        jax.distributed.initialize(settings["coordinator"], settings["num_processes"], settings["process_id"],
                                   initialization_timeout=int(max(30, 5 * seconds)), heartbeat_timeout_seconds=hb,
                                   shutdown_timeout_seconds=int(max(5, seconds)))
    gs = _jd.global_state
    _start(gs.client, gs.process_id, gs.num_processes, seconds)
    return _state["count"] > 1


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:  # noqa: BLE001 - private API moved: do not block initialize on it
        return False


# ------------------------------------------------------------------------------------------ work split
def owner(item: int, count: int | None = None) -> int:
    """The process that computes work item ``item`` (round robin)."""
    return int(item) % (process_count() if count is None else count)


def next_tag(kind: str) -> str:
    """A key prefix unique to this call: every process makes the same calls in the same order, so the
    n-th call of ``kind`` gets the same tag in all of them (call it from the main thread)."""
    with _lock:
        n = _state["tags"].get(kind, 0)
        _state["tags"][kind] = n + 1
    return f"{kind}{n}"


class Part:
    """A share of independent work items for one process, and the exchange of their results.

    ``select(n)`` gives the indices (of n items) this process computes; ``gather(mine, values)``
    (values: an array whose rows belong to ``mine``) returns (indices, values) of all items from all
    processes, in item order.  ``tag`` names the exchange in the key-value store (unique per call).
    """

    def __init__(self, tag: str, index: int | None = None, count: int | None = None):
        self.tag = tag
        self.index = process_index() if index is None else int(index)
        self.count = process_count() if count is None else int(count)

    def select(self, n: int):
        import numpy as np

        return np.arange(self.index, int(n), self.count)

    def gather(self, mine, values, key: str = ""):
        import numpy as np

        parts = gather(f"{self.tag}/{key}", (np.asarray(mine), np.asarray(values)))
        idx = np.concatenate([p[0] for p in parts])
        vals = np.concatenate([p[1] for p in parts])
        order = np.argsort(idx, kind="stable")
        return idx[order], vals[order]


# ------------------------------------------------------------------------------------------ exchange
def _client():
    if not active():
        raise RuntimeError("efftheory.distributed: not running several processes (call initialize first)")
    return _state["client"]


def _is_timeout(e: Exception) -> bool:
    return "DEADLINE_EXCEEDED" in str(e)


def _unreachable(e: Exception, what: str) -> DistributedError:
    return DistributedError(f"process {process_index()}: the coordinator (process 0) stopped answering while "
                            f"{what} ({' '.join(str(e).split())[:200]}); process 0 has probably died", 0)


def check_alive() -> None:
    """Raise DistributedError naming the first process whose heartbeat has not changed for the timeout,
    or the failure another process reported (:func:`abort`)."""
    client, seen, now = _state["client"], _state["seen"], time.monotonic()
    try:
        failed = client.key_value_try_get(f"{_PREFIX}/failed")
    except Exception as e:  # noqa: BLE001
        if "NOT_FOUND" not in str(e):
            raise _unreachable(e, "checking on the other processes") from None
    else:
        who, _, message = failed.partition("\n")
        raise DistributedError(message, int(who) if who.lstrip("-").isdigit() and int(who) >= 0 else None)
    for j in range(_state["count"]):
        if j == _state["index"]:
            continue
        try:
            value = client.key_value_try_get(f"{_PREFIX}/heartbeat/{j}")
        except Exception as e:  # noqa: BLE001
            if "NOT_FOUND" not in str(e):
                raise _unreachable(e, f"checking on process {j}") from None
            value = None
        last = seen.get(j)
        if last is None or last[0] != value:
            seen[j] = (value, now)
        elif now - last[1] > _state["timeout"]:
            raise DistributedError(f"process {j} of {_state['count']} stopped: no heartbeat for "
                                   f"{now - last[1]:.1f} s (EFFTHEORY_DISTRIBUTED_TIMEOUT = {_state['timeout']:g} s); it "
                                   "has probably died or been killed: see its own output", j)


def _wait(key: str, source: int) -> bytes:
    from ._cancel import check_stop

    client = _client()
    while True:
        check_stop()  # a cancelled look-ahead thread (finite_width) stops waiting
        try:
            return client.blocking_key_value_get_bytes(key, POLL_MS)
        except Exception as e:  # noqa: BLE001
            if not _is_timeout(e):
                raise _unreachable(e, f"waiting for process {source}") from None
        check_alive()


def abort(error: BaseException, status: int = 3) -> None:
    """End this process after a failure without JAX's shutdown (which would wait for a dead process):
    the failure is published so that the processes still waiting report it at once, and process 0,
    whose coordinator they need to read it, lingers two polls first."""
    import sys

    if active():
        who = getattr(error, "process", None)
        try:
            _state["client"].key_value_set(f"{_PREFIX}/failed", f"{-1 if who is None else who}\n{error}",
                                           allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator is gone
            pass
        if process_index() == 0:
            time.sleep(2.5 * POLL_MS / 1000)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def share(key: str, value: Any) -> None:
    """Publish ``value`` (any picklable object) under ``key`` from this process."""
    client = _client()
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    base = f"{_PREFIX}/kv/{key}/{process_index()}"
    pieces = [data[i:i + PIECE_BYTES] for i in range(0, len(data), PIECE_BYTES)] or [b""]
    try:
        for i, p in enumerate(pieces):
            client.key_value_set_bytes(f"{base}/{i}", p)
        client.key_value_set(f"{base}/n", str(len(pieces)))  # written last: the value is complete
    except Exception as e:  # noqa: BLE001
        raise _unreachable(e, f"sharing {key!r}") from None


def fetch(key: str, source: int, *, readers: int = 1) -> Any:
    """The value process ``source`` shared under ``key`` (waits for it; DistributedError if a process
    dies meanwhile).  After ``readers`` processes fetched it, the last one deletes it."""
    base = f"{_PREFIX}/kv/{key}/{source}"
    n = int(_wait(f"{base}/n", source).decode())
    data = b"".join(_wait(f"{base}/{i}", source) for i in range(n))
    client = _client()
    try:
        if client.key_value_increment(f"{_PREFIX}/reads/{key}/{source}", 1) >= readers:
            client.key_value_delete(base)
            client.key_value_delete(f"{_PREFIX}/reads/{key}/{source}")
    except Exception as e:  # noqa: BLE001
        raise _unreachable(e, f"reading {key!r}") from None
    return pickle.loads(data)


def gather(key: str, value: Any) -> list:
    """Every process's ``value``, in process order, on every process."""
    if not active():
        return [value]
    share(key, value)
    me, P = process_index(), process_count()
    return [value if j == me else fetch(key, j, readers=P - 1) for j in range(P)]


def agree(key: str, value: Any = None, source: int = 0) -> Any:
    """Process ``source``'s ``value`` on every process (the others' ``value`` is ignored)."""
    if not active():
        return value
    if process_index() == source:
        share(key, value)
        return value
    return fetch(key, source, readers=process_count() - 1)


def my_share(key: str, items: list) -> list:
    """Process 0's list ``items`` (work still to do, e.g. the steps missing from a cache), agreed by all
    processes under ``key``, cut to this process's round-robin share: every P-th item from its index on."""
    items = agree(key, items)
    return [g for i, g in enumerate(items) if owner(i) == process_index()]


def barrier(key: str) -> None:
    """Return once every process has reached ``barrier(key)`` (DistributedError if one died)."""
    gather(key, None)
