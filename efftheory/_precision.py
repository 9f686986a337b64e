"""float64 for efftheory's own computations, without touching the user's JAX settings.

Importing efftheory does not turn on ``jax_enable_x64``.  Instead every public function (and every
public method of the public result classes) of efftheory's modules runs inside a local
``jax.enable_x64(True)`` context (:func:`x64`), so the theory computes in float64 and returns
float64 arrays whatever the user's setting, and the user's own code keeps its dtypes.  JAX's
config contexts are thread-local: code that computes in a thread enters the context there too
(:func:`thread_context`).

Under a JAX transformation (``jax.jit``, ``jax.vmap``, ``jax.grad``) the inputs are tracers of the
user's trace, whose dtypes were fixed by the user's setting: with 64-bit mode off they are float32,
and computing the theory from them would silently lose half the digits.  The wrapper then raises
:class:`X64Error`, saying how to turn 64-bit mode on for the transformed call.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax

try:  # jax >= 0.6 names the context jax.enable_x64; older releases (the pinned neural-tangents env) keep it in experimental
    enable_x64 = jax.enable_x64
except AttributeError:  # pragma: no cover - exercised in the neural-tangents environment (jax 0.5.3)
    from jax.experimental import enable_x64

__all__ = ["x64", "enable_x64", "x64_unless_traced", "X64Error", "has_tracer", "is_tracer", "wrap_module", "thread_context"]

_WRAPPED = "__efftheory_x64__"

X64_HINT = ("turn on JAX's 64-bit mode around the transformed call: jax.config.update('jax_enable_x64', True) "
            "at the start of the program, or `with jax.enable_x64(True):` (jax.experimental.enable_x64 before jax 0.6) "
            "around jax.jit/vmap/grad(...)(...)")


class X64Error(ValueError):
    """efftheory was called under a JAX transformation while JAX's 64-bit mode is off."""


def is_tracer(v) -> bool:
    return isinstance(v, jax.core.Tracer)


def has_tracer(obj, _depth: int = 0) -> bool:
    """True when ``obj`` is, or holds (tuples, lists, dicts, an MLP's hyperparameters), a JAX tracer."""
    if is_tracer(obj):
        return True
    if _depth > 4:
        return False
    if isinstance(obj, (tuple, list)):
        return any(has_tracer(v, _depth + 1) for v in obj)
    if isinstance(obj, dict):
        return any(has_tracer(v, _depth + 1) for v in obj.values())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and type(obj).__name__ == "MLP":
        return any(has_tracer(getattr(obj, f, ()), _depth + 1)
                   for f in ("C_Ws", "C_bs", "lambda_Ws", "lambda_bs", "skips", "branches"))
    return False


def enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def check_traced(name: str, *args) -> None:
    """Raise X64Error when some argument is a tracer and 64-bit mode is off."""
    if not enabled() and has_tracer(args):
        raise X64Error(f"{name}: called under a JAX transformation (jit, vmap or grad) with JAX's 64-bit mode "
                       f"off, so the traced inputs are float32 and the theory would silently lose precision; "
                       f"{X64_HINT}")


def x64(fn):
    """Run ``fn`` in a local ``jax.enable_x64(True)`` context (a no-op when 64-bit mode is already on).

    With 64-bit mode off, tracers among the arguments raise :class:`X64Error` (module docstring).
    """
    if getattr(fn, _WRAPPED, False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if enabled():
            return fn(*args, **kwargs)
        check_traced(getattr(fn, "__qualname__", getattr(fn, "__name__", "efftheory")), args, kwargs)
        with enable_x64(True):
            return fn(*args, **kwargs)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def x64_unless_traced(fn):
    """Like :func:`x64`, for functions that are meant to run in the user's own traces at the user's
    precision (the empirical module, which chooses float32 or float64 per call): outside a trace they
    run in a local 64-bit context (so that a float64 request is honoured), inside a trace with 64-bit
    mode off they run as they are (float32)."""
    if getattr(fn, _WRAPPED, False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if enabled() or has_tracer((args, kwargs)):
            return fn(*args, **kwargs)
        with enable_x64(True):
            return fn(*args, **kwargs)

    setattr(wrapper, _WRAPPED, True)
    return wrapper


def thread_context():
    """A context manager that gives a worker thread the caller's 64-bit setting (call it in the caller's
    thread, enter the returned context in the worker)."""
    return enable_x64(enabled())


def _wrap_class(cls, wrap=x64) -> None:
    for name, attr in list(vars(cls).items()):
        if name.startswith("__"):
            continue
        if isinstance(attr, classmethod):
            setattr(cls, name, classmethod(wrap(attr.__func__)))
        elif isinstance(attr, staticmethod):
            setattr(cls, name, staticmethod(wrap(attr.__func__)))
        elif isinstance(attr, property) and attr.fget is not None and not name.startswith("_"):
            setattr(cls, name, property(wrap(attr.fget), attr.fset, attr.fdel, attr.__doc__))
        elif inspect.isfunction(attr) and not name.startswith("_"):
            setattr(cls, name, wrap(attr))


def wrap_module(module, *, names=None, lenient: bool = False) -> None:
    """Wrap the public functions (``__all__``, or ``names``) of ``module`` with :func:`x64` (``lenient``:
    :func:`x64_unless_traced`) in place, and the public methods of its public classes defined there."""
    wrap = x64_unless_traced if lenient else x64
    for name in (names if names is not None else getattr(module, "__all__", ())):
        obj = getattr(module, name, None)
        if inspect.isclass(obj):
            if obj.__module__ == module.__name__ and not getattr(obj, _WRAPPED, False):
                _wrap_class(obj, wrap)
                try:
                    setattr(obj, _WRAPPED, True)
                except (TypeError, AttributeError):  # pragma: no cover
                    pass
        elif inspect.isfunction(obj) and not getattr(obj, _WRAPPED, False):
            setattr(module, name, wrap(obj))
