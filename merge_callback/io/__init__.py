"""Reading checkpoints and writing soups.

- :mod:`~merge_callback.io.atomic`: atomic file and folder writes, stale temporaries;
- :mod:`~merge_callback.io.readers`: one reader for every checkpoint format;
- :mod:`~merge_callback.io.soups`: one writer per soup format (safetensors + sidecar, Hugging
  Face folder, sharded) and the sharded soups' reader and consolidation.
"""

from merge_callback.io.atomic import (TEMPORARY_NAME, atomic_directory, atomic_write_bytes,
                                      atomic_write_json, json_safe, publish_modes,
                                      remove_stale_temporaries, save_safetensors_atomic,
                                      temporary_owner)
from merge_callback.io.readers import (CHECKPOINT_FORMATS, INDEX_NAME, SINGLE_NAME, TensorReader,
                                       TensorSpec, checkpoint_format, detect_key_prefix,
                                       lightning_state_dict, load_state_dict)

__all__ = ["TEMPORARY_NAME", "atomic_directory", "atomic_write_bytes", "atomic_write_json",
           "json_safe", "publish_modes", "remove_stale_temporaries", "save_safetensors_atomic",
           "temporary_owner",
           "CHECKPOINT_FORMATS", "INDEX_NAME", "SINGLE_NAME", "TensorReader", "TensorSpec",
           "checkpoint_format", "detect_key_prefix", "lightning_state_dict", "load_state_dict"]
