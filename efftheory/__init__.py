"""efftheory: wide neural networks from first principles, checked against sampled networks.

Precision, and no global side effects: importing efftheory changes none of JAX's settings (the
user's ``jnp.ones(3).dtype`` and compilation-cache settings stay what they were).  The theory still
computes in float64 whatever the user's setting: every public function (and result method) runs in
a local ``jax.enable_x64(True)`` context and returns float64 arrays (:mod:`efftheory._precision`).
Under the user's own ``jax.jit``/``vmap``/``grad`` the inputs are the user's tracers, so the
transformed call needs 64-bit mode: ``jax.config.update("jax_enable_x64", True)`` or
``with jax.enable_x64(True):`` around it; without it the theory raises a clear
:class:`efftheory._precision.X64Error` instead of computing in float32.  The empirical module
chooses its dtype explicitly (float32 or float64) per call; its float64 path runs in the same local
context.

JAX transformations: :func:`infinite_width`, :func:`chi_parallel`, :func:`chi_perp` and
:func:`finite_width` on one input (two for smooth activations) are pure JAX functions of the inputs and of the MLP's
hyperparameters (which may be traced scalars or per-layer arrays): ``jax.jit``, ``jax.vmap`` and
``jax.grad`` go through them (README, "For neural-tangents users").

CPU cores: XLA runs one computation on one core, so a CPU machine computes in parallel only across
JAX devices, and JAX gives a CPU one device unless asked for more.  efftheory leaves that alone by
default.  ``EFFTHEORY_CPU_DEVICES=n`` (or ``all``: one per core available to the process) asks JAX
for n CPU devices at import (``jax_num_cpu_devices``; only while JAX's backends are not initialised
and ``XLA_FLAGS`` does not set ``xla_force_host_platform_device_count`` already); the finite-width
sources, ensemble sampling and training then spread their work over them (results identical to one
device).  Not the default because XLA:CPU's multi-device runtime is fragile: in jax 0.10.2 a batched
LAPACK call (``jnp.linalg.qr``, ``cholesky``, ``solve``) inside a program that runs on two CPU
devices at once can deadlock (efftheory's own sharded code avoids LAPACK; user code may not).

Compiled programs: a persistent compilation cache for efftheory's kernels is opt-in:
:func:`enable_compile_cache` (or ``EFFTHEORY_COMPILE_CACHE=on`` or a directory at import) points
JAX's persistent cache at ``~/.cache/efftheory/xla`` (or the directory), so that a later process
loads the finite-width kernels an earlier one compiled instead of compiling them again (most of a
fresh process's first finite_width call at N = 32: :mod:`efftheory._compile_cache`).  JAX's cache
settings are process-wide, which is why importing efftheory leaves them alone.
"""

import os as _os

import jax as _jax


def _cpu_devices() -> int | None:
    """The CPU device count ``EFFTHEORY_CPU_DEVICES`` asks for (None: leave JAX's setting alone)."""
    env = _os.environ.get("EFFTHEORY_CPU_DEVICES", "").strip().lower()
    if not env:
        return None
    if env != "all" and (not env.isdigit() or int(env) < 1):
        raise ValueError(f"EFFTHEORY_CPU_DEVICES: expected a positive integer or 'all', got {env!r}")
    if "xla_force_host_platform_device_count" in _os.environ.get("XLA_FLAGS", ""):
        return None  # the user's own XLA flag wins
    if env != "all":
        return int(env)
    try:
        return max(1, len(_os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, _os.cpu_count() or 1)


_n_cpu = _cpu_devices()
if _n_cpu is not None and _n_cpu > 1:
    try:
        _jax.config.update("jax_num_cpu_devices", _n_cpu)
    except RuntimeError:  # JAX already computed something: its devices are fixed for this process
        pass

from ._compile_cache import configure as _configure_compile_cache
from ._compile_cache import enable_compile_cache

_configure_compile_cache()  # only when EFFTHEORY_COMPILE_CACHE asks for it


def _wrap_modules() -> None:
    """Every public function of the theory modules runs in float64 (:mod:`efftheory._precision`)."""
    import importlib

    from . import _precision

    for name in ("gaussian._rules", "gaussian._mehler", "gaussian._hermite", "gaussian._sources", "gaussian._derivatives",
                 "gaussian", "theory.infinite", "theory.finite",
                 "theory.criticality", "theory.dntk", "theory.distribution", "predict.infinite", "predict.finite",
                 "predict.bayes", "predict", "datasets"):
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ImportError:  # pragma: no cover - an optional module missing its dependency
            continue
        _precision.wrap_module(mod)
    # compare, compare_train, plotting and plotting_train import matplotlib: they wrap themselves
    # (last lines of each module) when first imported, so that `import efftheory` stays light.


_wrap_modules()

from . import bayes, datasets, predict, predict_finite
from .activations import Activation, get_activation
from .bayes import FiniteWidthPosterior, PosteriorAtWidth, posterior_from_statistics
from .network import MLP, Layer
from .predict import (
    GPPosterior,
    GradientDescentPrediction,
    TrainTestKernels,
    gp_posterior,
    gradient_descent,
    last_layer_net,
    train_test_kernels,
)
from .predict_finite import TrainedMeanFirstOrder, trained_mean_first_order
from .theory.criticality import (
    Criticality,
    chi_parallel,
    chi_perp,
    critical_init,
    fixed_point,
)
from .theory.distribution import OutputDistribution, output_distribution  # (issue #26)
from .theory.dntk import DNTKStatistics, dntk_statistics
from .theory.finite import (
    FiniteWidth,
    FiniteWidthDiagonal,
    Prediction,
    finite_width,
    finite_width_diagonal,
)
from .theory.infinite import InfiniteWidth, infinite_width, kernel_fn

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "MLP",
    "Layer",
    "InfiniteWidth",
    "FiniteWidth",
    "Prediction",
    "finite_width",
    "FiniteWidthDiagonal",
    "finite_width_diagonal",
    "infinite_width",
    "kernel_fn",
    "Criticality",
    "critical_init",
    "chi_parallel",
    "chi_perp",
    "fixed_point",
    "get_activation",
    "datasets",
    "predict",
    "TrainTestKernels",
    "GradientDescentPrediction",
    "GPPosterior",
    "train_test_kernels",
    "gradient_descent",
    "gp_posterior",
    "last_layer_net",
    "DNTKStatistics",
    "dntk_statistics",
    "bayes",
    "FiniteWidthPosterior",
    "PosteriorAtWidth",
    "posterior_from_statistics",
    "predict_finite",
    "TrainedMeanFirstOrder",
    "trained_mean_first_order",
    "OutputDistribution",
    "output_distribution",
    "enable_compile_cache",
]
