"""efftheory: wide neural networks from first principles, checked against sampled networks.

Theory runs in float64: importing efftheory turns on JAX's 64-bit mode (``jax_enable_x64``).
The empirical module chooses its dtype explicitly (float32 or float64) per call.

CPU cores: XLA runs one computation on one core, so a CPU machine computes in parallel only across
JAX devices.  Importing efftheory therefore asks JAX for one CPU device per core available to the
process (``jax_num_cpu_devices``), which the finite-width sources and the ensemble sampling and
training spread their work over.  It does so only while JAX's backends are not yet initialised and
the device count is not set already (``XLA_FLAGS=--xla_force_host_platform_device_count=...`` or
``jax_num_cpu_devices``); set ``EFFTHEORY_CPU_DEVICES=n`` to choose n yourself (1: JAX's default).
"""

import os as _os

import jax as _jax

_jax.config.update("jax_enable_x64", True)


def _cpu_devices() -> int | None:
    """The CPU device count efftheory asks for (None: leave JAX's setting alone)."""
    env = _os.environ.get("EFFTHEORY_CPU_DEVICES", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"EFFTHEORY_CPU_DEVICES: expected a positive integer, got {env!r}")
        return int(env)
    if "xla_force_host_platform_device_count" in _os.environ.get("XLA_FLAGS", ""):
        return None
    if _jax.config.jax_num_cpu_devices != -1:
        return None
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
]
