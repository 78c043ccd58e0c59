"""ldmscale.checkpoint: everything a checkpoint is, written and read.

store.py         the files of one save (every rank's, fsynced, renamed into place), `latest`, keep-last-K
integrity.py     COMPLETE as a manifest: the save's id and every file's size (damage found before loading)
resume.py        which checkpoint a run resumes from: `latest`, fallback past a damaged one, the model check
checkpointer.py  the loop's checkpointer: the objects it saves, when to save, restore
slices.py        a rank's share of ema.safetensors, read without the rest
elastic.py       another world size: DeepSpeed's universal conversion, tied to the save it came from
universal_cli.py `ldmscale-universal`: that conversion offline, for the largest jobs
loading.py       inference and warm starts: EMA or raw weights, the whole trained model
preflight.py     what a checkpoint argument names, checked from its small files before any weights load
warm_start.py    style step 2 starts from step 1's U-Net
posthoc_ema.py   post-hoc EMA: the power-function profiles' maths, snapshots, the least-squares reconstruction
posthoc_cli.py   ldmscale-ema: the EMA of any length from the snapshots, written as a checkpoint folder
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; imported on first use, so `ldmscale-universal` or the store do not import diffusers
_EXPORTS = {
    "COMPLETE": "integrity", "is_complete": "integrity",
    "TrainedModel": "loading", "load_ema": "loading", "load_trained": "loading", "raw_state_dict": "loading",
    "saved_config": "loading",
    "find_tag_dir": "resume", "latest_tag": "resume", "resolve_resume": "resume",
    "CheckpointError": "store", "CheckpointStore": "store", "read_rank_states": "store",
    "read_trainer_state": "store", "tag_for": "store", "universal_dir": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
