r"""Tails and tolerances of the Gaussian engine, in one place, with why they differ.

Every rule integrates over a standard-normal variable u (z = scale x u) cut at |u| <= tail, and aims
at a target accuracy.  The numbers differ because the rules and what they integrate differ; each one
was set (and is tested) for its own rule, so none of them may change without changing results.

Tails (half-width of the u range; the Gaussian mass beyond it in parentheses):

* ``RULE_TAIL = 9``: the trapezoid rules of one and two inputs (:func:`normal_rule`, ``expect1``,
  ``expect2``, the Hermite moments of two inputs), which serve the infinite-width kernels and
  criticality at ~1e-13 relative (2e-19).
* ``MEHLER_TAIL = 13``: the one-dimensional rule of the Mehler coefficients f_k = <f h_k>, whose
  integrand carries a Hermite function h_k that grows like exp(x^2/4) (Cramer's inequality): the
  integrand decays like exp(-x^2/4) only, below 5e-19 at 13 (:mod:`._mehler`).
* ``SOURCE_TAIL = 8``: the widest range of the three- and four-input trapezoid rules of the sources
  (1.2e-15), which aim at ``SOURCE_TOL``; each set may cut it further (``_sources._tail_for``).
* ``FIXED_TAIL = 7.5``: the fixed-step rules that do not adapt their range: the isotropic rule for
  kinked, non-homogeneous sigma in the sources and the midpoint rule of the four-input derivative
  moments of the dNTK (6e-14).

Tolerances (default target accuracy):

* ``RULE_TOL = 1e-13``: one and two inputs, relative (cheap: rounding-level is affordable).
* ``MEHLER_TOL = 1e-11``: the bound (B) on a truncated Mehler series, relative to
  sqrt(<f_a^2> <f_b^2>); pairs that miss it go to the two-input rule.
* ``RESOLVE_TOL = 1e-8``: the accuracy below which the capped one- and two-input rules refuse a
  variance (``_rules.rule_size``): past K ~ 3.4e3 they stop adding nodes, and a variance where they
  measure worse than this raises instead of returning a silently wrong kernel.
* ``SOURCE_TOL = 1e-9``: three and four inputs (finite_width's and dntk_statistics' ``tol``), where
  every digit costs nodes in four dimensions.
"""

from __future__ import annotations

RULE_TAIL = 9.0
MEHLER_TAIL = 13.0
SOURCE_TAIL = 8.0
FIXED_TAIL = 7.5

RULE_TOL = 1e-13
MEHLER_TOL = 1e-11
SOURCE_TOL = 1e-9
RESOLVE_TOL = 1e-8
