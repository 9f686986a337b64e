"""Reports: theory against sampled networks, as tables, JSON and figures.

* :mod:`.compare`: statistics at initialization (metric, four-point vertex, NTK mean and variance)
  measured over width sweeps against infinite width and first order in 1/n;
* :mod:`.compare_train`: trained networks against the infinite-width and first-order predictions;
* :mod:`.plotting`, :mod:`.plotting_train`: their figures (matplotlib; imported only here, so that
  ``import efftheory`` stays light);
* :mod:`._table`: the one table formatter and the JSON helpers both reports use.

The old names ``efftheory.compare``, ``efftheory.compare_train``, ``efftheory.plotting`` and
``efftheory.plotting_train`` are these modules.
"""
