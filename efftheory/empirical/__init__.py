"""Sampled finite networks, measured the way docs/theory.md's predictions are stated.

* :mod:`.networks`   init_params, apply, apply_all, learning_rates (one finite MLP)
* :mod:`.tangent`    ntk, ntk_full (exact NTK from the layer structure), ntk_autodiff (any apply_fn)
* :mod:`.moments`    per-network sufficient statistics (averages over one network's neurons)
* :mod:`.ensemble`   sample, sample_ensemble: M networks per width, chunked, reproducible, resumable
* :mod:`.statistics` estimators with standard errors over networks: metric, four_point, ntk_mean, ...
* :mod:`.sweep`      width_sweep_fit, verdict, slope_consistent: the a + c1/n + c2/n^2 protocol
* :mod:`.training`   train: full-batch gradient descent on ensembles (learning-rate tensor, NTK at start and end)
* :mod:`.trained_parts` trained_mean_estimators: per-network frozen-NTK / NTK-motion parts of the trained mean
* :mod:`.dntk`       network_dntk, dntk_estimates: the dNTK and ddNTK of finite networks (jvp/vjp), P..U estimates
"""

from .cache import CacheMismatchError
from .dntk import DNTKEstimates, NetworkDNTK, dntk_estimates, network_dntk
from .ensemble import Ensemble, Sweep, default_chunk, sample, sample_ensemble
from .moments import STATISTICS
from .networks import apply, apply_all, init_params, learning_rates
from .statistics import (
    Estimate,
    NTKPreactivation,
    NTKVariance,
    four_point,
    four_point_same_neuron,
    fourth_moment_ratio,
    jackknife,
    mean_and_stderr,
    metric,
    ntk_mean,
    ntk_preactivation,
    ntk_variance,
)
from .sweep import (
    SLOPE_NSIGMA,
    SLOPE_TOLERANCE,
    VERDICTS,
    WidthFit,
    agrees,
    c1_scale,
    count_verdicts,
    residual_scaling,
    slope_consistent,
    verdict,
    width_sweep_fit,
)
from .tangent import ntk, ntk_autodiff, ntk_full
from .trained_parts import frozen_ntk_estimator, trained_mean_estimators
from .training import Training, default_train_chunk, train

__all__ = [
    "CacheMismatchError",
    "DNTKEstimates",
    "NetworkDNTK",
    "dntk_estimates",
    "network_dntk",
    "Ensemble",
    "Estimate",
    "NTKPreactivation",
    "NTKVariance",
    "SLOPE_NSIGMA",
    "SLOPE_TOLERANCE",
    "STATISTICS",
    "Sweep",
    "Training",
    "VERDICTS",
    "WidthFit",
    "agrees",
    "apply",
    "apply_all",
    "c1_scale",
    "count_verdicts",
    "default_chunk",
    "default_train_chunk",
    "fourth_moment_ratio",
    "frozen_ntk_estimator",
    "four_point",
    "four_point_same_neuron",
    "init_params",
    "jackknife",
    "learning_rates",
    "mean_and_stderr",
    "metric",
    "ntk",
    "ntk_autodiff",
    "ntk_full",
    "ntk_mean",
    "ntk_preactivation",
    "ntk_variance",
    "residual_scaling",
    "sample",
    "sample_ensemble",
    "slope_consistent",
    "train",
    "trained_mean_estimators",
    "verdict",
    "width_sweep_fit",
]


def _wrap_precision() -> None:
    """float64 requests honoured without JAX's global 64-bit mode (efftheory._precision): every public
    function runs in a local x64 context, except inside a user's trace with 64-bit mode off."""
    import importlib
    import sys

    from .. import _precision

    for sub in ("cache", "distribution", "dntk", "ensemble", "joint", "moments", "networks", "statistics",
                "sweep", "tangent", "trained_parts", "training"):
        try:
            _precision.wrap_module(importlib.import_module(f"{__name__}.{sub}"), lenient=True)
        except ImportError:  # pragma: no cover
            continue
    _precision.wrap_module(sys.modules[__name__], lenient=True)


_wrap_precision()
