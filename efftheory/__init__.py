"""efftheory: wide neural networks from first principles, checked against sampled networks.

Theory runs in float64: importing efftheory turns on JAX's 64-bit mode (``jax_enable_x64``).
The empirical module chooses its dtype explicitly (float32 or float64) per call.
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)

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
