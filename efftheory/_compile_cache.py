"""JAX's persistent compilation cache, on by default for efftheory's kernels.

The finite-width sources compile one XLA program per kernel shape: about 200 at N = 32, which take
most of a fresh process's first call (76 s of 131 s for the first layer at N = 32 on a 2-core
CPU).  JAX can keep compiled programs on disk and load them in a later process instead of
compiling again (``jax_compilation_cache_dir``); :func:`configure` turns that on at import.

``EFFTHEORY_COMPILE_CACHE``:
  * unset: ``$XDG_CACHE_HOME/efftheory/xla`` (``~/.cache/efftheory/xla``);
  * a directory: that one;
  * ``off`` (or ``0``, ``false``, ``no``, ``none``): no cache.

Programs are kept in a subdirectory named after the machine's instruction set (a hash of the
architecture and the CPU's feature flags), so a home directory shared by different CPUs never
loads code built for another one.  A cache the user configured for JAX (``JAX_COMPILATION_CACHE_DIR``
or ``jax.config``) is left alone, as is everything when the directory cannot be created.  The
settings are JAX's own and therefore process-wide: programs compiled in at least 0.2 s are kept,
up to 1 GiB (least recently used dropped first).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform

import jax

__all__ = ["configure", "cache_dir"]

_OFF = {"off", "0", "false", "no", "none"}
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
    """The directory ``EFFTHEORY_COMPILE_CACHE`` (or ``env``) asks for, None when it turns the
    cache off."""
    env = os.environ.get("EFFTHEORY_COMPILE_CACHE") if env is None else env
    env = (env or "").strip()
    if env.lower() in _OFF:
        return None
    if env:
        base = os.path.expanduser(env)
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "efftheory", "xla")
    return os.path.join(base, _isa_tag())


def configure() -> str | None:
    """Point JAX's persistent compilation cache at :func:`cache_dir` unless the user configured
    one; returns the directory in use by efftheory's choice (None: off, or the user's own)."""
    try:
        if jax.config.jax_compilation_cache_dir is not None:
            return None
    except AttributeError:  # a JAX without a persistent cache
        return None
    path = cache_dir()
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
