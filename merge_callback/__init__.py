"""merge_callback: merge every new training checkpoint with the previous one, λ chosen on held-out data.

``BayesMergeCallback`` (PyTorch Lightning) and ``BayesMergeTrainerCallback`` (Hugging Face
``Trainer``) are imported on first use, so importing the package pulls in neither framework.
"""

from merge_callback.merge import lerp_state_dicts, weighted_average
from merge_callback.search import SearchResult, search_lambda

__version__ = "0.1.0"

__all__ = ["BayesMergeCallback", "BayesMergeTrainerCallback", "lerp_state_dicts",
           "weighted_average", "SearchResult", "search_lambda", "__version__"]

_LAZY = {"BayesMergeCallback": "merge_callback.lightning",
         "BayesMergeTrainerCallback": "merge_callback.hf"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'merge_callback' has no attribute {name!r}")
