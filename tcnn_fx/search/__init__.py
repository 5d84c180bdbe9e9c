"""Search over which convolutions to convert: the space, the Optuna study, candidate measurement, the front."""

from tcnn_fx.search.space import GROUPINGS, Group, SearchSpace
from tcnn_fx.search.study import OBJECTIVES, Constraints, SearchSettings, load_study, open_storage, run_search

__all__ = [
    "GROUPINGS",
    "OBJECTIVES",
    "Constraints",
    "Group",
    "SearchSettings",
    "SearchSpace",
    "load_study",
    "open_storage",
    "run_search",
]
