"""The training side of post-hoc EMA (train.posthoc_ema): EDM2's power-function EMAs, one per sigma_rel, each kept
like the ordinary EMA (ldmscale.trainer.ema: every rank its share of the fp32 masters, no communication per update),
snapshotted every N steps for `ldmscale-ema` (ldmscale.checkpoint.posthoc_ema) and saved in checkpoints, so a
resumed run continues every profile bitwise."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ldmscale.checkpoint.posthoc_ema import SNAPSHOT_DIR, beta, sigma_rel_to_exp, write_snapshot
from ldmscale.checkpoint.store import CheckpointError
from ldmscale.runtime import dist
from ldmscale.trainer.ema import EMA, SliceReader

STATE_FILE = "posthoc_ema.safetensors"  # in each checkpoint folder


def check_resumable(tag_dir: Path | None, sigma_rels: list[float]) -> None:
    """Before any process group: a checkpoint resumed with train.posthoc_ema must hold the same profiles."""
    if tag_dir is None or not sigma_rels:
        return
    f = tag_dir / STATE_FILE
    if not f.exists():
        raise CheckpointError(f"{tag_dir} has no {STATE_FILE}: it was saved without train.posthoc_ema, whose profiles "
                              f"start at step 1; resume with train.posthoc_ema.sigma_rels=[] or start a new run "
                              f"(another train.out_dir)")
    with safe_open(str(f), framework="pt") as h:
        saved = sorted({float(k.split("/", 1)[0]) for k in h.keys()})
    if saved != sorted(sigma_rels):
        raise CheckpointError(f"{f} holds post-hoc EMA profiles {saved}, but train.posthoc_ema.sigma_rels is "
                              f"{sigma_rels}: resume with train.posthoc_ema.sigma_rels={saved}")


class PostHocEMA:
    """Power-function EMAs of the trainable weights; `state_dict` and `snapshot` are collectives."""

    STATE_FILE = STATE_FILE

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], sigma_rels: list[float], every: int,
                 run_dir: Path, optimizer: Any = None) -> None:
        self.sigma_rels, self.every, self.folder = list(sigma_rels), every, run_dir / SNAPSHOT_DIR
        self.gammas = [sigma_rel_to_exp(s) for s in sigma_rels]
        self.profiles = [EMA(named_params, 0.0, optimizer) for _ in sigma_rels]

    def update(self, step: int) -> None:
        """After optimizer step number `step` (1, 2, ...): a function of the step only, so it resumes exactly."""
        for ema, gamma in zip(self.profiles, self.gammas):
            ema.update(beta(gamma, step))

    def maybe_snapshot(self, step: int, last: bool = False) -> list[Path]:
        """Every `every` steps and at the last step: each profile's full weights to OUT/posthoc_ema/ (rank 0
        writes; every rank must call it)."""
        if not (last or step % self.every == 0):
            return []
        written = []
        for sigma_rel, ema in zip(self.sigma_rels, self.profiles):
            weights = ema.state_dict()  # collective: full on rank 0
            if dist.rank() == 0:
                written.append(write_snapshot(self.folder, step, sigma_rel, weights))
        return written

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every profile, keys `<sigma_rel>/<parameter>`, full on rank 0 ({} elsewhere). Collective."""
        out: dict[str, torch.Tensor] = {}
        for sigma_rel, ema in zip(self.sigma_rels, self.profiles):
            out.update({f"{sigma_rel!r}/{k}": v for k, v in ema.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor] | SliceReader) -> None:
        """Every rank takes its shares of every profile (keys as `state_dict` wrote them), from a dict or from a
        reader of the saved file (ldmscale.checkpoint.slices.TensorSlices), which reads only this rank's share."""
        for sigma_rel, ema in zip(self.sigma_rels, self.profiles):
            prefix = f"{sigma_rel!r}/"
            if isinstance(state, Mapping):
                ema.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            else:
                ema.load_state_dict(_Profile(state, prefix))


class _Profile:
    """One profile of a post-hoc EMA file, read as slices: the keys and reads of `reader` under `prefix`."""

    def __init__(self, reader: SliceReader, prefix: str) -> None:
        self.reader, self.prefix = reader, prefix

    def keys(self) -> set[str]:
        return {k[len(self.prefix):] for k in self.reader.keys() if k.startswith(self.prefix)}

    def flat_slice(self, name: str, start: int, numel: int) -> torch.Tensor:
        return self.reader.flat_slice(self.prefix + name, start, numel)
