"""merge_callback: merge every new training checkpoint with the previous one, λ chosen on held-out data."""

from merge_callback.merge import lerp_state_dicts, weighted_average
from merge_callback.search import SearchResult, search_lambda

__version__ = "0.1.0"

__all__ = ["lerp_state_dicts", "weighted_average", "SearchResult", "search_lambda", "__version__"]
