r"""The Gaussian engine: every expectation <f(z)>_K, z ~ N(0, K), that the theory needs.

One package, one set of constants (:mod:`._constants`: tails and tolerances, and why they differ),
modules by what they integrate:

* :mod:`._rules`: trapezoid rules for the standard normal and the one-, two- and k-input
  expectations built on them (``expect1``, ``expect2``, ``expectk``); ``derivative``; ``rule_size``,
  which refuses (:class:`UnresolvedVariance`) a variance past ``resolvable_variance`` (``rule_error``);
  ``pair_moments_quadrature``: S = <sigma_a sigma_b>, dS = <sigma'_a sigma'_b> for all pairs by the
  two-input rule.
* :mod:`._mehler`: ``pair_moments_mehler``, the same S, dS by the Mehler (Hermite) series in the
  correlation (N one-input rules instead of N^2 two-input ones); what infinite_width calls.
* :mod:`._fastmath`: ``pair_kernel``, closed-form pair kernels (relu, abs, erf) in fast jnp.
* :mod:`._hermite`: Gaussian integration by parts in whitened coordinates: Hermite moments of two
  inputs, for the derivative expectations of the finite-width recursions.
* :mod:`._sources`: ``source_moments``, <s s s s>, <s' s' s s>, <s' s' s' s'> over every set of up to
  four inputs: the sources of finite_width's V, A, B, D, F; with :mod:`._tables` (interpolated
  conditional moments of the nested rule) and :mod:`._orthant` (exact orthant moments for kinked
  homogeneous sigma).
* :mod:`._derivatives`: ``derivative_moments``, moments of sigma and its first three derivatives over
  up to four inputs: the sources of dntk_statistics.

The names below are what the rest of efftheory (:mod:`efftheory.theory`, the plots) calls; the
submodules are private.
"""

from ._constants import (
    FIXED_TAIL,
    MEHLER_TAIL,
    MEHLER_TOL,
    RESOLVE_TOL,
    RULE_TAIL,
    RULE_TOL,
    SOURCE_TAIL,
    SOURCE_TOL,
)
from ._derivatives import PAIRS as DERIVATIVE_PAIRS
from ._derivatives import PATTERNS as DERIVATIVE_PATTERNS
from ._derivatives import derivative_moments
from ._fastmath import PairKernel, pair_kernel
from ._hermite import (
    hermite_from_monomials_np,
    hermite_moments2,
    polar_monomials_np,
    trapezoid_monomials_np,
    whiten2,
    whiten2_np,
)
from ._mehler import pair_moments_mehler
from ._rules import (
    UnresolvedVariance,
    derivative,
    expect1,
    expect2,
    expectk,
    nodes_for,
    normal_rule,
    pair_moments_quadrature,
    range_factor,
    resolvable_variance,
    rule_error,
    rule_size,
)
from ._sources import HOST_SETS, SET_BLOCK, SET_BYTES, AccuracyWarning, source_moments
from ._tables import sd_values

__all__ = [
    "normal_rule", "nodes_for", "rule_size", "derivative", "expect1", "expect2", "expectk", "range_factor",
    "rule_error", "resolvable_variance", "UnresolvedVariance",
    "pair_moments_quadrature", "pair_moments_mehler", "pair_kernel", "PairKernel",
    "whiten2", "hermite_moments2", "whiten2_np", "hermite_from_monomials_np", "polar_monomials_np",
    "trapezoid_monomials_np", "sd_values",
    "source_moments", "AccuracyWarning", "HOST_SETS", "SET_BLOCK", "SET_BYTES",
    "derivative_moments", "DERIVATIVE_PATTERNS", "DERIVATIVE_PAIRS",
    "RULE_TAIL", "RULE_TOL", "MEHLER_TAIL", "MEHLER_TOL", "SOURCE_TAIL", "SOURCE_TOL", "FIXED_TAIL", "RESOLVE_TOL",
]
