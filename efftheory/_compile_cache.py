"""JAX's persistent compilation cache for efftheory's kernels: opt-in.

The finite-width sources compile one XLA program per kernel shape: about 200 at N = 32, which take
most of a fresh process's first call (76 s of 131 s for the first layer at N = 32 on a 2-core
CPU; docs/scaling.md, "Finite width: speed").  JAX can keep compiled programs on disk and load them in a later process
instead of compiling again (``jax_compilation_cache_dir``).  The setting is JAX's own and
process-wide (it applies to every program the process compiles, the user's too), so importing
efftheory leaves it alone; ask for it with :func:`enable_compile_cache` or the environment:

``EFFTHEORY_COMPILE_CACHE`` (read once, at import):
  * unset, or ``off`` (``0``, ``false``, ``no``, ``none``): nothing is changed;
  * ``on`` (``1``, ``true``, ``yes``): ``$XDG_CACHE_HOME/efftheory/xla`` (``~/.cache/efftheory/xla``);
  * a directory: that one.

Programs are kept in a subdirectory named after the machine's instruction set (a hash of the
architecture and the CPU's feature flags), so a home directory shared by different CPUs never
loads code built for another one.  A cache the user configured for JAX (``JAX_COMPILATION_CACHE_DIR``
or ``jax.config``) is left alone, as is everything when the directory cannot be created.  Programs
compiled in at least 0.2 s are kept, up to 1 GiB (least recently used dropped first).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform

import jax

__all__ = ["configure", "cache_dir", "enable_compile_cache"]

_OFF = {"off", "0", "false", "no", "none"}
_ON = {"on", "1", "true", "yes"}
MIN_COMPILE_SECONDS = 0.2
MAX_BYTES = 1 << 30


def _isa_tag() -> str:
    """12 hex digits naming the instruction set: architecture plus the CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:  # not Linux
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()}|{flags}".encode()).hexdigest()[:12]


def cache_dir(env: str | None = None) -> str | None:
    """The directory ``EFFTHEORY_COMPILE_CACHE`` (or ``env``) asks for: None when unset or off, the
    default directory for ``on``."""
    env = os.environ.get("EFFTHEORY_COMPILE_CACHE") if env is None else env
    env = (env or "").strip()
    if not env or env.lower() in _OFF:
        return None
    if env.lower() not in _ON:
        base = os.path.expanduser(env)
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "efftheory", "xla")
    return os.path.join(base, _isa_tag())


def configure(path: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``path`` (default: :func:`cache_dir`, i.e. what
    ``EFFTHEORY_COMPILE_CACHE`` asks for) unless the user configured one; returns the directory in
    use by efftheory's choice (None: off, or the user's own)."""
    try:
        if jax.config.jax_compilation_cache_dir is not None:
            return None
    except AttributeError:  # a JAX without a persistent cache
        return None
    path = cache_dir() if path is None else path
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec("filelock") is not None:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)  # JAX needs filelock for it
    return path


def enable_compile_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache for this process, for efftheory's kernels (opt-in).

    ``path``: a directory (programs go to a subdirectory named after the instruction set), or None
    for ``$XDG_CACHE_HOME/efftheory/xla``.  It speeds up a fresh process's first finite-width call,
    most of which is compiling the source kernels (at N = 32 about 200 programs, 76 s of the first
    layer's 131 s on a 2-core CPU; docs/scaling.md, "Finite width: speed"); later calls in one process are unaffected.
    The setting is JAX's own and process-wide (the user's programs are cached too), which is why
    efftheory never turns it on by itself.  A cache already configured for JAX is left alone.
    Returns the directory now in use by efftheory's choice, None when JAX already had one or the
    directory cannot be created.
    """
    if path is None:
        return configure(cache_dir("on"))
    from . import _validate

    path = _validate.optional_path("path", path)
    return configure(os.path.join(os.path.expanduser(path), _isa_tag()))
