"""ldmscale.checkpoint: everything a checkpoint is, written and read.

store.py         the files of one save (every rank's, COMPLETE, `latest`), resume resolution, keep-last-K
checkpointer.py  the loop's checkpointer: the objects it saves, when to save, restore
elastic.py       another world size: DeepSpeed's universal conversion
loading.py       inference and warm starts: EMA or raw weights, the whole trained model
preflight.py     what a checkpoint argument names, checked from its small files before any weights load
warm_start.py    style step 2 starts from step 1's U-Net
"""

from ldmscale.checkpoint.loading import TrainedModel, load_ema, load_trained, raw_state_dict, saved_config
from ldmscale.checkpoint.store import (
    COMPLETE,
    CheckpointError,
    CheckpointStore,
    find_tag_dir,
    is_complete,
    latest_tag,
    read_rank_states,
    read_trainer_state,
    resolve_resume,
    tag_for,
    universal_dir,
)

__all__ = [
    "COMPLETE", "CheckpointError", "CheckpointStore", "TrainedModel", "find_tag_dir", "is_complete", "latest_tag",
    "load_ema", "load_trained", "raw_state_dict", "read_rank_states", "read_trainer_state", "resolve_resume",
    "saved_config", "tag_for", "universal_dir",
]
