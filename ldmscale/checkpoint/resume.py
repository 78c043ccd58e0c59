"""Which checkpoint a run resumes from, and whether it may.

- `resolve_resume` (every rank, before any process group; one small file each): `auto` takes the tag `latest`
  names, `never` none, a path its checkpoint. Cheap on purpose: it stats no shard.
- `select_intact` (rank 0 once the group is up; the others get its answer): the manifest check of that choice.
  A damaged checkpoint (a file truncated or deleted after COMPLETE) under `auto` falls back to the newest intact
  one before it, with a warning naming the file; an explicit path is refused with one line.
- `check_same_model`: a config whose model differs from the checkpoint's is refused with the keys that differ,
  before any weight is read (instead of DeepSpeed listing hundreds of state_dict keys).
"""

from __future__ import annotations

from pathlib import Path

from ldmscale.checkpoint.integrity import damage, is_complete
from ldmscale.checkpoint.store import CheckpointError, ResumeError, complete_tags, read_latest
from ldmscale.config import Config, config_from_yaml_text

# What a checkpoint's weights depend on: changing any of these on resume cannot load them.
MODEL_KEYS = (
    ("train", "stage"), ("model", "unet"), ("model", "vae_preset"), ("style", "enabled"), ("style", "backbone"),
    ("style", "vision_model"), ("style", "conv_channels"), ("style", "num_tokens"), ("style", "colour_stats"),
    ("style", "clip_head"), ("style", "global_path"), ("model", "size_conditioning"), ("model", "size_embed_dim"),
)
# keys whose None means a default that depends on another key: compared as what they resolve to
RESOLVED = {("style", "colour_stats"): "uses_colour_stats", ("style", "global_path"): "uses_global_path"}


def resolve_latest(root: Path) -> tuple[str | None, list[str]]:
    """(the tag `latest` names, warnings), or (None, []) for a fresh run. A `latest` naming a folder that is not
    complete (removed, or never finished by hand-made edits) gives the newest complete checkpoint before it."""
    tag = read_latest(root)
    if tag is None or is_complete(root / tag):
        return tag, []
    older = [t for t in complete_tags(root) if t < tag]
    if not older:
        raise ResumeError(
            f"{root / 'latest'} names {tag}, which has no COMPLETE marker: the save did not finish, and no complete "
            f"checkpoint precedes it; give a complete step_* folder of {root} (ls it), or start training over with "
            f"--resume never"
        )
    return older[-1], [f"{root / 'latest'} names {tag}, which is not complete; resuming from {older[-1]} instead"]


def latest_tag(root: Path) -> str | None:
    """The tag of the checkpoint `--resume auto` takes under root (None: a fresh run); resolve_latest also says why
    it is not the one `latest` names, when it is not."""
    return resolve_latest(root)[0]


def find_tag_dir(path: Path, verify: bool = True) -> Path:
    """A checkpoint root (with `latest`), a run dir (with checkpoints/), or a tag folder -> the tag folder.
    verify: check every file against the manifest (one stat per file; the trainer does that on rank 0 only)."""
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").exists():
        tag = latest_tag(path)
        assert tag is not None
        path = path / tag
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint; give a run dir, its checkpoints/ or a step_* folder")
    if not is_complete(path) and not any(path.glob("*model_states.pt")) and not (path / "trainer_state.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint (no DeepSpeed files, no trainer_state.json); give a run "
                              f"dir, its checkpoints/ or a step_* folder")
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is a partial checkpoint (no COMPLETE marker: its save was interrupted); use an earlier step"
        )
    if verify:
        problem = damage(path)
        if problem:
            raise CheckpointError(f"{path} is damaged: {problem}; use an earlier step")
    return path


def resolve_resume(root: Path, resume: str) -> tuple[Path | None, list[str]]:
    """(`auto`: latest if any; `never`: None; otherwise a checkpoint folder, warnings). Checks neither
    manifest nor model: select_intact and check_same_model do, once."""
    if resume == "never":
        return None, []
    if resume == "auto":
        tag, notes = resolve_latest(root)
        return (root / tag if tag else None), notes
    try:
        return find_tag_dir(Path(resume), verify=False), []
    except CheckpointError as e:
        raise ResumeError(str(e)) from None


def select_intact(chosen: Path | None, auto: bool) -> tuple[Path | None, list[str]]:
    """`chosen` if every file of it is as the save wrote it. Under `auto` a damaged one gives way to the newest
    intact checkpoint before it (warning naming the file); an explicit one is refused."""
    notes: list[str] = []
    while chosen is not None:
        problem = damage(chosen)
        if problem is None:
            return chosen, notes
        if not auto:
            raise ResumeError(f"{chosen} is damaged: {problem}; resume from an earlier step, or --resume auto")
        older = [t for t in complete_tags(chosen.parent) if t < chosen.name]
        if not older:
            raise ResumeError(f"{chosen} is damaged: {problem}, and no complete checkpoint precedes it; repair it, "
                              f"or start over with --resume never (another train.out_dir keeps it)")
        notes.append(f"WARNING: checkpoint {chosen.name} is damaged ({problem}); resuming from {older[-1]} instead")
        chosen = chosen.parent / older[-1]
    return None, notes


def check_same_model(tag_dir: Path, cfg: Config) -> None:
    """Refuse, naming the keys, when `cfg` builds another model than the one saved in tag_dir."""
    saved_file = tag_dir / "config.yaml"
    if not saved_file.exists():
        return  # nothing to compare with; DeepSpeed's load is then the check
    try:
        saved = config_from_yaml_text(saved_file.read_text())
    except Exception as e:  # a config of another ldmscale version: DeepSpeed's load is then the check
        raise ResumeError(f"{saved_file} cannot be read as a config ({str(e)[:200]}); resume with the ldmscale "
                          f"version that wrote it") from None
    diffs = []
    for section, key in MODEL_KEYS:
        attr = RESOLVED.get((section, key), key)
        old, new = getattr(getattr(saved, section), attr), getattr(getattr(cfg, section), attr)
        if section == "style" and key != "enabled" and not (saved.style.enabled or cfg.style.enabled):
            continue
        if section == "model" and key == "vae_preset" and cfg.train.stage != "autoencoder":
            continue
        if section == "model" and key == "size_embed_dim" and not (saved.model.size_conditioning
                                                                   or cfg.model.size_conditioning):
            continue
        if old != new:
            diffs.append(f"{section}.{key}: {old!r} -> {new!r}")
    if diffs:
        raise ResumeError(
            f"{tag_dir} holds another model than this config builds ({'; '.join(diffs)}); resume with the "
            f"checkpoint's settings (see {saved_file}), or start a new run in another train.out_dir"
        )
