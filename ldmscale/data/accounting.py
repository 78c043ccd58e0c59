"""The data's accounting, summed over ranks in the trainer's one reduction per step: samples dropped by reason
(the job's failure budget reads them), and for a mixture, per source, the samples drawn (this step and since the
run began) and its drop counters. Logged as `data/dropped_<reason>` and, per source, `data/<name>/share` (the
realised share of the samples drawn in the logging window), `data/<name>/samples`, `data/<name>/passes` (samples
drawn since the run began / the source's samples after filtering) and `data/<name>/dropped_<reason>`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# every reason a sample or shard is dropped, in a fixed order: ranks sum their counts in one all-reduce
DROP_REASONS = (
    "no_image", "no_caption", "caption_short", "caption_long", "no_json", "no_size", "too_narrow", "too_short",
    "aspect", "similarity", "nsfw", "watermark", "unsafe", "bad_json", "too_large", "decode_error", "shard_retry",
    "shard_error", "shard_missing", "style_self_ref", "other",
)


def drop_vector(counts: dict[str, int]) -> list[float]:
    """Counts in DROP_REASONS order (unknown reasons under "other")."""
    other = sum(v for k, v in counts.items() if k not in DROP_REASONS)
    return [float(counts.get(r, 0)) for r in DROP_REASONS[:-1]] + [float(other)]


@dataclass
class SourceTally:
    """One source's sums over all ranks."""

    name: str
    drawn_step: float  # samples drawn from it in this step
    drawn: float  # since the run began
    dropped: dict[str, float]  # this epoch, by reason


@dataclass
class DataTally:
    """The job's data sums of one step."""

    dropped: dict[str, float]  # this epoch, all sources, by reason
    sources: list[SourceTally] = field(default_factory=list)  # a mixture's sources (empty for one source)


class Accounting:
    """Packs a rank's counters into the step's reduction and reads the job's sums back; keeps the logging
    window's per-source draws (every rank alike: they all see the same sums)."""

    def __init__(self, names: list[str], sizes: list[int | None]) -> None:
        self.names, self.sizes = names, sizes
        self.window = [0.0] * len(names)

    def vector(self, dropped: list[dict[str, int]], drawn_step: list[int], drawn: list[int]) -> list[float]:
        """This rank's part of the reduction: its drops (all sources), then per source (mixtures only) its draws this
        step, since the run began, and its drops."""
        total: Counter[str] = Counter()
        for counts in dropped:
            total.update(counts)
        vec = drop_vector(dict(total))
        if len(self.names) > 1:
            for k in range(len(self.names)):
                vec += [float(drawn_step[k]), float(drawn[k]), *drop_vector(dropped[k])]
        return vec

    def read(self, values: list[float]) -> DataTally:
        """The job's sums from the reduced vector (and the window's draws updated)."""
        n = len(DROP_REASONS)
        tally = DataTally(dict(zip(DROP_REASONS, values[:n])))
        if len(self.names) > 1:
            for k, name in enumerate(self.names):
                part = values[n + k * (n + 2): n + (k + 1) * (n + 2)]
                tally.sources.append(SourceTally(name, part[0], part[1], dict(zip(DROP_REASONS, part[2:]))))
                self.window[k] += part[0]
        return tally

    def metrics(self, tally: DataTally) -> dict[str, float]:
        """What a log step shows: the job's drops, and per source its share of the window's draws, its draws and
        passes since the run began, its drops. Starts the next window."""
        out: dict[str, float] = {f"data/dropped_{k}": int(v) for k, v in tally.dropped.items() if v}
        window = sum(self.window)
        for k, s in enumerate(tally.sources):
            if window:
                out[f"data/{s.name}/share"] = self.window[k] / window
            out[f"data/{s.name}/samples"] = int(s.drawn)
            if self.sizes[k]:
                out[f"data/{s.name}/passes"] = s.drawn / self.sizes[k]  # type: ignore[operator]
            out.update({f"data/{s.name}/dropped_{r}": int(v) for r, v in s.dropped.items() if v})
        self.window = [0.0] * len(self.names)
        return out
