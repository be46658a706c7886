"""The framework-free engine every front end drives.

- :mod:`~merge_callback.engine.snapshot`: host copies of the weights (page-locked on CUDA);
- :mod:`~merge_callback.engine.sharded`: views of each rank's local shards;
- :mod:`~merge_callback.engine.families`: averaging families and the one combine kernel;
- :mod:`~merge_callback.engine.round`: ``run_round`` and the soup it chose;
- :mod:`~merge_callback.engine.schedule`: everything between framework events and a round;
- :mod:`~merge_callback.engine.options`: option constants and argument validation.
"""

from merge_callback.engine.families import (EmaTrack, Family, combine_into_, ema_family,
                                            geometric_family, live_targets, pairwise_family,
                                            stage_on_devices)
from merge_callback.engine.options import check_positive_int, validate_callback_args
from merge_callback.engine.round import (MergeRoundError, RoundConfig, RoundResult, build_soup,
                                         run_round, soup_from_live, soup_state_dict)
from merge_callback.engine.schedule import ChosenSoup, MergeSchedule, Runtime
from merge_callback.engine.sharded import ShardLayout, ShardLocalView, is_sharded, local_state_dict
from merge_callback.engine.snapshot import ShardedSnapshot, Snapshot, capture_snapshot

__all__ = ["Snapshot", "ShardedSnapshot", "capture_snapshot", "ShardLayout", "ShardLocalView",
           "is_sharded", "local_state_dict", "Family", "pairwise_family", "geometric_family",
           "ema_family", "combine_into_", "EmaTrack", "live_targets", "stage_on_devices",
           "RoundConfig", "RoundResult", "MergeRoundError", "run_round", "build_soup",
           "soup_state_dict", "soup_from_live", "MergeSchedule", "Runtime", "ChosenSoup",
           "check_positive_int", "validate_callback_args"]
