"""Tuning of overlap plans: cost model, exact grouping, search, measurements, on-disk cache.

Layout (one concept per module):

* :mod:`.model`   -- the watcher-stream pipeline model and the O(n^2) exact DP that groups
  row bands (plans are restore-free: a group is a run of whole bands);
* :mod:`.search`  -- search over tiles x SM reservations, analytic defaults, the never-slower
  decision, and the measuring driver :func:`tune`;
* :mod:`.measure` -- GPU measurements (bandwidth curves under contention, wave times; band end
  times follow from the waves), written against small callables so the plumbing is tested
  on CPU;
* :mod:`.cache`   -- JSON cache of tuned configs, validated with pydantic;
* :mod:`.cli`     -- the ``tune`` command (mounted by ``flashoverlap.cli``).

The engine's path: ``cache.lookup(cache.detect_key(problem))`` or, on a miss,
``search.engine_default(...)`` (``analytic_default`` on the kernel table's tile) plus
``search.predict_gain(...)`` for the fallback to sequential.  These modules import torch only inside the functions that need a GPU (the
``flashoverlap`` package itself imports torch for its ops).

``search.search`` is not re-exported here: the name would shadow the ``search`` submodule.
"""

from flashoverlap.tuning.cache import CacheEntry, CacheKey, detect_key, lookup, make_key, store
from flashoverlap.tuning.model import CommCurve, optimal_partition, overlap_wins, predict
from flashoverlap.tuning.search import (
    AnalyticModel,
    analytic_default,
    analytic_search,
    engine_default,
    predict_gain,
    tune,
)

__all__ = [
    "AnalyticModel",
    "CacheEntry",
    "CacheKey",
    "CommCurve",
    "analytic_default",
    "analytic_search",
    "engine_default",
    "detect_key",
    "lookup",
    "make_key",
    "optimal_partition",
    "overlap_wins",
    "predict",
    "predict_gain",
    "store",
    "tune",
]
