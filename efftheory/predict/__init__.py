"""Predictions for trained networks and Bayesian posteriors, from the kernels of :mod:`efftheory.theory`.

* :mod:`.infinite`: infinite width: gradient descent with the frozen NTK and the exact NNGP
  posterior (``train_test_kernels``, ``gradient_descent``, ``gp_posterior``, ...; re-exported here, so
  ``efftheory.predict.gradient_descent`` keeps its name);
* :mod:`.finite`: the first-order (1/n) correction to the trained mean (``trained_mean_first_order``;
  also ``efftheory.predict_finite``);
* :mod:`.bayes`: the first-order Bayesian posterior (``posterior``, ``posterior_from_statistics``; also
  ``efftheory.bayes``).
"""

from . import infinite as _infinite
from .infinite import *  # noqa: F403 - the infinite-width API is this package's face (efftheory.predict.gradient_descent)

__all__ = list(_infinite.__all__)
