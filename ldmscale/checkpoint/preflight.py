"""What a checkpoint argument names, found from its small files alone (no weights read), so that
`ldmscale-sample`, `-export` and `-eval` refuse a wrong one before any model loads.

A training checkpoint (run dir, its checkpoints/ folder, or a step_* folder) is described by its config.yaml and
trainer_state.json; an exported diffusers folder (model_index.json) by the `ldmscale_export.json` record that
ldmscale-export writes beside it: which checkpoint, step and weights it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldmscale.checkpoint.resume import find_tag_dir
from ldmscale.checkpoint.store import CheckpointError, read_trainer_state
from ldmscale.config import Config, ConfigError, config_from_yaml_text

EXPORT_RECORD = "ldmscale_export.json"
WEIGHTS = ("ema", "raw")


@dataclass
class CheckpointInfo:
    path: Path  # as given
    tag_dir: Path | None  # None for an exported diffusers folder
    cfg: Config | None  # the saved training config; None for an exported folder
    step: int | None
    weights: str  # "ema" or "raw": what will be loaded

    @property
    def exported(self) -> bool:
        return self.tag_dir is None

    @property
    def style(self) -> bool:
        return self.cfg is not None and self.cfg.style.enabled


def read_export_record(folder: Path) -> dict[str, Any]:
    """{checkpoint, step, weights} of an exported folder; {} for folders written by other tools."""
    try:
        return dict(json.loads((folder / EXPORT_RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


EXPORT_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(path: Path) -> None:
    """A diffusers pipeline folder has its parts, and the U-Net's and VAE's configs read as JSON."""
    missing = [part for part in EXPORT_PARTS if not (path / part).is_dir()]
    for part in ("unet", "vae"):
        try:
            if not isinstance(json.loads((path / part / "config.json").read_text()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):
            missing.append(f"{part}/config.json")
    if missing:
        raise CheckpointError(f"{path} has a model_index.json but is not a whole diffusers pipeline (missing or "
                              f"unreadable: {', '.join(sorted(set(missing)))}); export it again with ldmscale-export")


def check_checkpoint(path: str | Path, weights: str | None = None) -> CheckpointInfo:
    """The checkpoint `path` names, checked far enough that loading it can only fail on a damaged file.
    weights: "ema" / "raw" as the user asked, or None for the default (EMA, or what an export holds)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint; give a run dir, its checkpoints/, a step_* folder or an "
                              f"exported diffusers folder (ldmscale-export)")
    if (path / "model_index.json").exists():
        if (path / "checkpoints").is_dir():
            raise CheckpointError(f"{path} holds both checkpoints/ and a diffusers export (model_index.json): give "
                                  f"{path / 'checkpoints'} for the checkpoint, or move the export into its own folder")
        check_pipeline_folder(path)
        record = read_export_record(path)
        held = record.get("weights")
        if weights is not None and held is not None and weights != held:
            raise CheckpointError(f"{path} is an export of the {held} weights of {record.get('checkpoint')}: export "
                                  f"the {weights} weights with ldmscale-export --weights {weights}, or drop --weights")
        if weights == "raw" and held is None:
            raise CheckpointError(f"{path} is an exported diffusers folder: it holds one set of weights, not EMA and "
                                  f"raw; drop --weights, or give the training checkpoint it came from")
        step = record.get("step")
        return CheckpointInfo(path, None, None, int(step) if step is not None else None, held or "ema")
    tag_dir = find_tag_dir(path)
    try:
        cfg = config_from_yaml_text((tag_dir / "config.yaml").read_text())
        state = read_trainer_state(tag_dir)
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{tag_dir}: its config.yaml or trainer_state.json is missing or unreadable "
                              f"({type(e).__name__}: {str(e)[:200]}); use an earlier step") from None
    if cfg.train.stage != "diffusion":
        raise CheckpointError(f"{tag_dir} is an autoencoder-stage checkpoint: it draws no images; its VAE is "
                              f"exported as {cfg.train.out_dir}/vae for a diffusion run's model.vae")
    weights = weights or "ema"
    if weights == "ema" and not (tag_dir / "ema.safetensors").exists():
        raise CheckpointError(f"{tag_dir} holds no EMA weights (ema.safetensors; train.ema_decay was 0?): "
                              f"pass --weights raw")
    if weights == "raw" and "posthoc_ema" in state:
        raise CheckpointError(f"{tag_dir} holds EMA weights only (a post-hoc EMA written by ldmscale-ema): use "
                              f"--weights ema")
    if weights == "raw" and not any(tag_dir.glob("*model_states.pt")):
        raise CheckpointError(f"{tag_dir} holds no raw weights (no DeepSpeed *model_states.pt): use --weights ema "
                              f"or an earlier step")
    return CheckpointInfo(path, tag_dir, cfg, step, weights)
