"""Start-up and resume at LAION-400M scale, simulated with the loader's own planning code (no data, no training).

    python tools/bench/resume_scale.py [--shards 41456] [--samples 10000] [--ranks 1024] [--workers 8] \
        [--global-batch 3072] [--block 1000] [--at 0.1] [--json out.json]

41,456 shard URLs ({00000..41455}) of 10,000 samples with synthetic sizes (mean ~39 KB a sample, +-10 % a
shard), split as the trainer splits them (ldmscale.data: source_shards, the per-rank batch count, fresh_roles,
DataPosition, resplit, saved_ranks_needed). No filter drops: a stream sample is a raw sample. Reported:
- the assignment: batches per rank (all equal?), shards per worker, samples repeated / left unread per epoch;
- requests to the store at start-up (every rank planning vs rank 0's plan, broadcast) and files each rank opens
  at a resume (every rank file vs the saved ranks its share lies in);
- the shard-failure budget: one worker's share of its few shards (before) vs the job's (data.max_failed_shards);
- bytes a plain resume reads again at 10 %, 50 %, 90 % of an epoch;
- resumes that re-divide the epoch's rest at `--at` of an epoch: ranks 1,024 -> 768 (micro-batch 3 -> 4 at the
  global batch 3072, which both divide) and loader workers 8 -> 6: per new worker, the samples and bytes it reads
  and the samples it decodes before its first batch, and what it passes over later, for the earlier loader
  (skipped batches decoded and dropped, pieces in concatenation order) and now (skipped samples read, never
  decoded; a piece that needs no skip first); every remaining sample checked to be given exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ldmscale.config import DataConfig
from ldmscale.data import preflight
from ldmscale.data.loader import ResumableLoader, failed_shard_budget
from ldmscale.data.mixture import Deal
from ldmscale.data.position import (
    DataPosition,
    RolePlan,
    Segment,
    ShardListId,
    SourceId,
    StreamPos,
    fresh_roles,
    resplit,
    role_batches,
    saved_ranks_needed,
)
from ldmscale.data.storage import DEFAULT_BLOCK_SIZE
from ldmscale.data.stream import StreamCursor, StreamState, seeded, source_shards

LIST_PAGE = 1000  # S3 ListObjectsV2 keys per page


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n < 1e12 else f"{n / 1e12:,.2f} TB"


def _mmm(values: list[float]) -> list[float]:
    return [min(values), statistics.median(values), max(values)]


class Sim:
    """The epoch-0 plan of `ranks` x `workers` over the synthetic shards, and positions part-way through it."""

    def __init__(self, a: argparse.Namespace, ranks: int, workers: int, micro: int, sample_bytes: np.ndarray) -> None:
        self.a, self.ranks, self.workers, self.micro = a, ranks, workers, micro
        self.sample_bytes = sample_bytes
        self.urls = [f"s3://laion/{i:05d}.tar" for i in range(a.shards)]
        self.shards = ShardListId.of(self.urls)
        cfg = DataConfig(shards=["s3://laion/{00000..41455}.tar"], num_workers=workers, shuffle_buffer=a.block)
        loader = ResumableLoader(cfg, None, seed=a.seed, rank=0, world=ranks, micro_batch=micro,
                                 samples_per_epoch=a.shards * a.samples, global_batch=a.global_batch, urls=self.urls)
        self.batches = loader.batches_per_epoch  # the loader's own sizing: the same on every rank
        self.order = list(range(a.shards))  # source_shards' epoch permutation, made once for all sources
        seeded(a.seed, 0).shuffle(self.order)
        assert self.split(ranks - 1, workers - 1) == source_shards(a.shards, a.seed, 0,
                                                                   (ranks - 1, ranks, workers - 1, workers))

    def split(self, rank: int, role: int) -> list[int]:
        return self.order[rank :: self.ranks][role :: self.workers]

    def cursor(self, rank: int, role: int, given: int) -> StreamCursor:
        """The stream's cursor after `given` samples (all shards of `samples` samples, no drops)."""
        a, shards = self.a, self.split(rank, role)
        start = given // a.block * a.block  # where the current shuffle block began
        cycle, inside = divmod(start, len(shards) * a.samples)
        order = list(shards)
        seeded(a.seed, 0, rank, self.ranks, role, self.workers, cycle).shuffle(order)
        k, offset = divmod(inside, a.samples)
        queue = [[order[k], offset]] + [[i, 0] for i in order[k + 1 :]]
        return StreamCursor(StreamState(cycle=cycle, queue=queue, kept=inside, block=start // a.block),
                            taken=given - start)

    def position(self, rank: int, frac: float) -> DataPosition:
        """Rank `rank`'s saved position after `frac` of the epoch (whole steps)."""
        accum = self.a.global_batch // (self.micro * self.ranks)
        done = int(self.batches * frac) // accum * accum
        roles = fresh_roles(rank, self.ranks, self.workers, self.batches, self.micro)
        for j, role in enumerate(roles):
            given = role_batches(done, self.workers, j) * self.micro
            seg = role.segments[0]
            cursor = StreamPos(self.cursor(rank, j, given), 0, {})
            role.segments = [Segment(seg.src, seg.samples - given, given, [cursor])]
        return DataPosition(epoch=0, given=done * self.micro, epoch_samples=self.batches * self.micro,
                            micro_batch=self.micro, global_batch=self.a.global_batch, world=self.ranks,
                            workers=self.workers, sources=[SourceId("default", 1.0, self.shards)],
                            deal=Deal(self.ranks, self.workers, self.micro, self.a.global_batch), roles=roles,
                            drawn=[0])


def first_batch_cost(a: argparse.Namespace, segments: list[Segment], micro: int, sample_bytes: np.ndarray
                     ) -> tuple[int, float, int]:
    """(samples read, bytes read, samples decoded) before a role's first batch: its open shard replayed to the
    block start, then the stream read on to the block holding the batch's last sample (skips included)."""
    read = byts = 0.0
    need = micro
    decoded = 0
    for seg in segments:
        c = seg.streams[0].cursor
        assert c is not None
        replay = c.start.queue[0][1]  # raw samples of the open shard before the block: read, dropped
        through = c.taken + seg.skip + min(need, seg.samples)
        blocks = math.ceil(through / a.block) * a.block  # whole blocks read (the last one is built to shuffle)
        read += replay + blocks
        byts += (replay + blocks) * float(sample_bytes[c.start.queue[0][0]])
        decoded += min(need, seg.samples)
        need -= min(need, seg.samples)
        if need == 0:
            break
    return int(read), byts, decoded


def re_division(a: argparse.Namespace, old: Sim, new_ranks: int, new_workers: int, new_micro: int,
                sample_bytes: np.ndarray) -> dict[str, object]:
    """Every new rank's share after old.position(a.at), its cost per worker (now and before), coverage checked."""
    saved: dict[int, DataPosition] = {}
    t0 = time.perf_counter()
    opens, now, before, skipped_now, skipped_before = [], [], [], [], []
    tiles: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for r in range(new_ranks):
        needed = saved_ranks_needed(r, new_ranks, old.ranks)
        opens.append(len(needed))
        for o in needed:
            if o not in saved:
                saved[o] = old.position(o, a.at)
        pos = resplit({o: saved[o] for o in needed}, old.ranks, world=new_ranks, workers=new_workers, rank=r,
                      micro_batch=new_micro, global_batch=a.global_batch, count_slots=lambda seg, n: [n])
        for role in pos.roles:
            now.append(first_batch_cost(a, role.segments, new_micro, sample_bytes))
            # the earlier loader: pieces in concatenation order, skipped batches decoded and dropped
            contiguous = _concatenation_order(role)
            read, byts, decoded = first_batch_cost(a, contiguous, new_micro, sample_bytes)
            before.append((read, byts, decoded + contiguous[0].skip))
            skipped_now.append(sum(s.skip for s in role.segments))
            skipped_before.append(sum(s.skip for s in role.segments))
            for s in role.segments:
                tiles[s.src].append((s.skip, s.skip + s.samples))
        for o in [o for o in saved if o < needed.start]:  # keep only what the next ranks may still need
            del saved[o]
    seconds = (time.perf_counter() - t0) / new_ranks
    left = sum(old.position(o, a.at).remaining for o in (0,)) * old.ranks
    once = all(_tiles_once(iv) for iv in tiles.values())
    assigned = sum(e - s for iv in tiles.values() for s, e in iv)
    col = lambda rows, k: [float(x[k]) for x in rows]  # noqa: E731
    return {
        "from": f"{old.ranks} x {old.workers} workers x micro {old.micro}",
        "to": f"{new_ranks} x {new_workers} workers x micro {new_micro}",
        "samples_left": left, "assigned": assigned, "each_once": once,
        "rank_files_opened": {"before": old.ranks, "now_max": max(opens)},
        "first_batch": {
            "now": {"read": _mmm(col(now, 0)), "bytes": _mmm(col(now, 1)), "decoded": _mmm(col(now, 2))},
            "before": {"read": _mmm(col(before, 0)), "bytes": _mmm(col(before, 1)), "decoded": _mmm(col(before, 2))},
        },
        "passed_over_later": {"now_read_not_decoded": _mmm(skipped_now), "before_decoded": _mmm(skipped_before)},
        "resplit_s_per_rank": round(seconds, 4),
    }


def _concatenation_order(role: RolePlan) -> list[Segment]:
    """The pieces as the earlier loader played them: the head-first sort undone (a piece that skips came first
    when it came first in the concatenation: the one continuing the previous rank's or role's stream)."""
    tails = [s for s in role.segments if s.skip]
    heads = [s for s in role.segments if not s.skip]
    return tails + heads  # a role's range starts inside a stream (a tail) unless it starts at a segment boundary


def _tiles_once(intervals: list[tuple[int, int]]) -> bool:
    """The pieces cut from one old stream cover its rest exactly once: no gap, no overlap."""
    intervals.sort()
    return intervals[0][0] == 0 and all(b[0] == a[1] for a, b in zip(intervals, intervals[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=41456)
    p.add_argument("--samples", type=int, default=10000, help="samples per shard")
    p.add_argument("--ranks", type=int, default=1024)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=3072, help="divisible by both world sizes of the re-split")
    p.add_argument("--block", type=int, default=1000, help="data.shuffle_buffer (the shuffle block)")
    p.add_argument("--at", type=float, default=0.1, help="the share of the epoch given before the re-divisions")
    p.add_argument("--max-failed-shards", type=float, default=DataConfig.max_failed_shards)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    sample_bytes = 39_000 * rng.uniform(0.9, 1.1, a.shards)  # mean bytes of a sample, per shard
    spe = a.shards * a.samples
    micro = a.global_batch // a.ranks
    t0 = time.perf_counter()
    sim = Sim(a, a.ranks, a.workers, micro, sample_bytes)
    roles = [(r, j, sim.split(r, j), role_batches(sim.batches, a.workers, j)) for r in range(a.ranks)
             for j in range(a.workers)]
    split_s = time.perf_counter() - t0
    held = np.array([len(s) * a.samples for *_, s, _ in roles])
    wanted = np.array([n * micro for *_, n in roles])
    repeated, unread = np.maximum(wanted - held, 0), np.maximum(held - wanted, 0)
    per_worker = sorted(Counter(len(s) for _, _, s, _ in roles).items())
    rows: dict[str, object] = {
        "shards": a.shards, "samples_per_shard": a.samples, "ranks": a.ranks, "workers": a.workers,
        "global_batch": a.global_batch, "micro": micro, "batches_per_rank": sim.batches,
        "shards_per_worker": per_worker, "repeated_total": int(repeated.sum()), "unread_total": int(unread.sum()),
        "split_s": round(split_s, 2),
    }
    # start-up: requests to the store, per job
    listing = math.ceil(a.shards / LIST_PAGE)
    sample_gets = math.ceil(preflight.PASS_SAMPLES * 39_000 / DEFAULT_BLOCK_SIZE)
    rank0 = listing + 1 + preflight.STATS_SAMPLED + preflight.PASS_SHARDS * sample_gets
    rows["startup_requests"] = {"every_rank_plans": a.ranks * (listing + 1 + preflight.STATS_SAMPLED),
                                "per_rank_before": listing + 1 + preflight.STATS_SAMPLED, "rank0_plans": rank0,
                                "other_ranks": 0}
    # the failure budget
    fewest = min(n for n, _ in per_worker)
    rows["failure_budget"] = {"before_per_worker": int(0.1 * fewest), "before_share": 0.1,
                              "now_job": failed_shard_budget(a.max_failed_shards, a.shards),
                              "now_setting": a.max_failed_shards}
    # a plain resume: what it reads again (the open shard up to the block, then the block)
    resume = {}
    for frac in (0.1, 0.5, 0.9):
        replay = now = 0.0
        for r, j, shards, n in roles[:: max(1, len(roles) // 2048)]:  # a sample of the roles, scaled up
            given = int(n * frac) * micro
            c = sim.cursor(r, j, given)
            full, offset = divmod(given, a.samples)
            order = (shards * (given // (len(shards) * a.samples) + 2))
            replay += sum(a.samples * sample_bytes[s] for s in order[:full]) + offset * sample_bytes[order[full]]
            # read and thrown away: the open shard up to the block's start, and the block's samples already given
            now += (c.start.queue[0][1] + c.taken) * sample_bytes[c.start.queue[0][0]]
        scale = len(roles) / len(roles[:: max(1, len(roles) // 2048)])
        resume[f"{int(frac * 100)}%"] = {"replay_epoch": replay * scale, "now": now * scale}
    rows["plain_resume_bytes"] = resume
    # resumes that re-divide the epoch's rest
    new_ranks = a.ranks * 3 // 4
    rows["world_change"] = re_division(a, sim, new_ranks, a.workers, a.global_batch // new_ranks, sample_bytes)
    rows["worker_change"] = re_division(a, sim, a.ranks, a.workers * 3 // 4, micro, sample_bytes)

    print(f"LAION-scale simulation: {a.shards:,} shards x {a.samples:,} samples, {a.ranks} ranks x {a.workers} "
          f"workers, global batch {a.global_batch} (micro {micro}), shuffle block {a.block}")
    print(f"  batches per rank per epoch     {sim.batches:,} on every rank; shards per worker {per_worker}")
    print(f"  repeated / unread per epoch    {rows['repeated_total']:,} / {rows['unread_total']:,} samples "
          f"({rows['repeated_total'] / spe:.2%})")
    s = rows["startup_requests"]
    print(f"  start-up store requests        every rank plans: {s['per_rank_before']} a rank, "  # type: ignore[index]
          f"{s['every_rank_plans']:,} a job | rank 0 plans: {s['rank0_plans']}, other ranks 0")  # type: ignore[index]
    b = rows["failure_budget"]
    fatal = f"failed shard {b['before_per_worker'] + 1} of a worker ends the job"  # type: ignore[index]
    print(f"  shard-failure budget           before: {b['before_per_worker']} shards a worker (0.1 x {fewest}: the "  # type: ignore[index]
          f"{fatal}) | now: {b['now_job']} shards for the job (data.max_failed_shards={a.max_failed_shards:g})")  # type: ignore[index]
    print("  a plain resume reads again     position | replaying the epoch | now (open shard to the position)")
    for k, v in resume.items():
        print(f"{k:>39} | {_gb(v['replay_epoch']):>19} | {_gb(v['now'])}")
    for name in ("world_change", "worker_change"):
        e = rows[name]
        fb = e["first_batch"]  # type: ignore[index]
        print(f"  re-division at {a.at:.0%}: {e['from']} -> {e['to']}")  # type: ignore[index]
        print(f"    samples left {e['samples_left']:,}, assigned {e['assigned']:,}, each exactly once: "  # type: ignore[index]
              f"{e['each_once']}; rank files opened per rank: before {e['rank_files_opened']['before']:,}, "  # type: ignore[index]
              f"now <= {e['rank_files_opened']['now_max']}; re-split {e['resplit_s_per_rank']} s a rank")  # type: ignore[index]
        for when in ("before", "now"):
            f = fb[when]
            print(f"    {when:>6}: per worker before its first batch (min/median/max): read "
                  f"{[int(x) for x in f['read']]} samples, {[_gb(x) for x in f['bytes']]}, decoded "
                  f"{[int(x) for x in f['decoded']]}")
        later = e["passed_over_later"]  # type: ignore[index]
        passed = [int(x) for x in later["now_read_not_decoded"]]
        print(f"    passed over later in the epoch per worker (min/median/max): {passed} samples (now read, not "
              f"decoded; before decoded)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
