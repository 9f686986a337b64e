"""efftheory: wide neural networks from first principles, checked against sampled networks.

Theory runs in float64: importing efftheory turns on JAX's 64-bit mode (``jax_enable_x64``).
The empirical module chooses its dtype explicitly (float32 or float64) per call.

CPU cores: XLA runs one computation on one core, so a CPU machine computes in parallel only across
JAX devices, and JAX gives a CPU one device unless asked for more.  efftheory leaves that alone by
default.  ``EFFTHEORY_CPU_DEVICES=n`` (or ``all``: one per core available to the process) asks JAX
for n CPU devices at import (``jax_num_cpu_devices``; only while JAX's backends are not initialised
and ``XLA_FLAGS`` does not set ``xla_force_host_platform_device_count`` already); the finite-width
sources, ensemble sampling and training then spread their work over them (results identical to one
device).  Not the default because XLA:CPU's multi-device runtime is fragile: in jax 0.10.2 a batched
LAPACK call (``jnp.linalg.qr``, ``cholesky``, ``solve``) inside a program that runs on two CPU
devices at once can deadlock (efftheory's own sharded code avoids LAPACK; user code may not).

Compiled programs: importing efftheory turns on JAX's persistent compilation cache in
``~/.cache/efftheory/xla`` unless JAX already has one, so a later process loads the kernels an
earlier one compiled instead of compiling them again (``EFFTHEORY_COMPILE_CACHE=off`` or a
directory: :mod:`efftheory._compile_cache`).
"""

import os as _os

import jax as _jax

_jax.config.update("jax_enable_x64", True)


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

from ._compile_cache import configure as _configure_compile_cache  # noqa: E402

_configure_compile_cache()

from .activations import Activation, get_activation  # noqa: E402
from .network import MLP  # noqa: E402
from .theory.infinite import InfiniteWidth, infinite_width  # noqa: E402
from .theory.finite import (  # noqa: E402
    FiniteWidth,
    FiniteWidthDiagonal,
    Prediction,
    finite_width,
    finite_width_diagonal,
)
from .theory.criticality import (  # noqa: E402
    Criticality,
    chi_parallel,
    chi_perp,
    critical_init,
    fixed_point,
)
from .theory.dntk import DNTKStatistics, dntk_statistics  # noqa: E402
from . import bayes, datasets, predict, predict_finite  # noqa: E402
from .bayes import FiniteWidthPosterior, PosteriorAtWidth, posterior_from_statistics  # noqa: E402
from .predict_finite import TrainedMeanFirstOrder, trained_mean_first_order  # noqa: E402
from .theory.distribution import OutputDistribution, output_distribution  # noqa: E402  (issue #26)
from .predict import (  # noqa: E402
    GPPosterior,
    GradientDescentPrediction,
    TrainTestKernels,
    gp_posterior,
    gradient_descent,
    last_layer_net,
    train_test_kernels,
)

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "MLP",
    "InfiniteWidth",
    "FiniteWidth",
    "Prediction",
    "finite_width",
    "FiniteWidthDiagonal",
    "finite_width_diagonal",
    "infinite_width",
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
    "output_distribution",
]
