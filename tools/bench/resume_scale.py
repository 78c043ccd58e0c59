"""Resume at LAION-400M scale, simulated with the loader's own planning code (no data, no training).

    python tools/bench/resume_scale.py [--shards 41455] [--samples 10000] [--ranks 128] [--workers 8] \
        [--micro 16] [--accum 1] [--block 1000] [--json out.json]

41,455 shard URLs of 10,000 samples with synthetic sizes (mean ~39 KB a sample, +-10 % a shard), split as
the trainer splits them (ldmscale.data: source_shards, the per-rank batch count, fresh_roles, resplit):
- the assignment: batches per rank (all equal?) and per worker role;
- repeated samples per epoch (a role cycles over its shards when its batches need more than they hold)
  and samples left unread (its shards hold more), spread over roles;
- requests made at start-up per job: every rank lists, HEADs and reads 16 stats (before) vs rank 0's
  preflight broadcast to the others (now: ldmscale.data.preflight's constants);
- bytes a resume reads again at 10 %, 50 % and 90 % of an epoch: replaying each worker's stream from the
  epoch start and skipping what it consumed (before) vs reopening each worker's current shard up to its
  shuffle block's start and the block's samples already taken (now), side by side, with their ratio;
- an elastic resume at 50 %: 128 -> 96 ranks, every remaining batch assigned exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ldmscale.config import DataConfig  # noqa: E402
from ldmscale.data import preflight  # noqa: E402
from ldmscale.data.loader import ResumableLoader  # noqa: E402
from ldmscale.data.position import DataPosition, fresh_roles, resplit  # noqa: E402
from ldmscale.data.storage import DEFAULT_BLOCK_SIZE  # noqa: E402
from ldmscale.data.stream import seeded, source_shards  # noqa: E402

LIST_PAGE = 1000  # S3 ListObjectsV2 keys per page


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n < 1e12 else f"{n / 1e12:,.2f} TB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=41455)
    p.add_argument("--samples", type=int, default=10000, help="samples per shard")
    p.add_argument("--ranks", type=int, default=128)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--block", type=int, default=1000, help="data.shuffle_buffer (the shuffle block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    sample_bytes = 39_000 * rng.uniform(0.9, 1.1, a.shards)  # mean bytes of a sample, per shard
    shard_bytes = sample_bytes * a.samples
    spe = a.shards * a.samples
    global_batch = a.micro * a.ranks * a.accum
    # the loader's own epoch sizing (no shards are touched: urls given, every worker has one)
    cfg = DataConfig(shards=["s3://laion/{00000..41454}.tar"], num_workers=a.workers)
    urls = [f"s3://laion/{i:05d}.tar" for i in range(a.shards)]
    per_rank = {ResumableLoader(cfg, None, seed=a.seed, rank=r, world=a.ranks, micro_batch=a.micro,
                                samples_per_epoch=spe, global_batch=global_batch, urls=urls).batches_per_epoch
                for r in (0, a.ranks - 1)}
    assert len(per_rank) == 1
    batches = per_rank.pop()
    t0 = time.perf_counter()
    order = list(range(a.shards))  # source_shards' epoch permutation, made once here for all 1,024 sources
    seeded(a.seed, 0).shuffle(order)
    roles = []  # (rank, role, shard indices, batches)
    for r in range(a.ranks):
        for seg in (role["segments"][0] for role in fresh_roles(r, a.ranks, a.workers, batches)):
            roles.append((r, seg["src"][2], order[r :: a.ranks][seg["src"][2] :: a.workers], seg["batches"]))
    assert roles[-1][2] == source_shards(a.shards, a.seed, 0, (a.ranks - 1, a.ranks, a.workers - 1, a.workers))
    split_s = time.perf_counter() - t0
    held = np.array([len(s) * a.samples for _, _, s, _ in roles])
    wanted = np.array([n * a.micro for *_, n in roles])
    repeated, unread = np.maximum(wanted - held, 0), np.maximum(held - wanted, 0)
    rows: dict[str, object] = {
        "shards": a.shards, "samples_per_shard": a.samples, "ranks": a.ranks, "workers": a.workers,
        "global_batch": global_batch, "steps_per_epoch": batches // a.accum, "batches_per_rank": batches,
        "batches_per_role": sorted(Counter(int(n) for *_, n in roles).items()),
        "shards_per_role": sorted(Counter(len(s) for _, _, s, _ in roles).items()),
        "repeated_per_role": [int(repeated.min()), int(np.median(repeated)), int(repeated.max())],
        "repeated_total": int(repeated.sum()), "unread_total": int(unread.sum()), "split_s": round(split_s, 2),
    }
    # start-up requests per job
    listing = math.ceil(a.shards / LIST_PAGE)
    before = a.ranks * (listing + 1 + preflight.STATS_SAMPLED)
    sample_gets = math.ceil(preflight.PASS_SAMPLES * 39_000 / DEFAULT_BLOCK_SIZE)
    now = listing + 1 + preflight.STATS_SAMPLED + preflight.PASS_SHARDS * sample_gets
    rows["startup_requests"] = {"before": before, "now": now}
    # bytes a resume reads again
    resume = {}
    for frac in (0.1, 0.5, 0.9):
        old = new = bound = 0.0
        for (_, _, shards, n) in roles:
            consumed = int(n * frac) * a.micro  # samples this role gave (no filter drops: 1:1 raw samples)
            order = shards * (consumed // (len(shards) * a.samples) + 1)
            full, offset = divmod(consumed, a.samples)
            old += sum(shard_bytes[s] for s in order[:full]) + offset * sample_bytes[order[full]]
            # now: the current shard is reopened and read up to the resume point (its shuffle block's start, then
            # the block's samples already taken are dropped); the rest of what is read is used
            new += offset * sample_bytes[order[full]]
            bound += shard_bytes[order[full]]
        resume[f"{int(frac * 100)}%"] = {"before": old, "now": new, "bound": bound, "ratio": new / old}
    rows["resume_bytes"] = resume
    # elastic: 128 -> 96 ranks at half the epoch
    new_world = a.ranks * 3 // 4
    half = batches // 2 // a.accum * a.accum
    saved = []
    for r in range(a.ranks):
        rl = fresh_roles(r, a.ranks, a.workers, batches)
        for j, role in enumerate(rl):
            role["segments"][0]["batches"] -= len(range(j, half, a.workers))
        saved.append(DataPosition(epoch=0, batches=half, epoch_batches=batches, world=a.ranks, workers=a.workers,
                                  roles=rl))
    t0 = time.perf_counter()
    given: Counter[tuple] = Counter()
    for r in range(new_world):
        pos = resplit(saved, new_world, a.workers, r)
        for role in pos.roles:
            for seg in role["segments"]:
                for b in range(seg["skip"], seg["skip"] + seg["batches"]):
                    given[(*seg["src"], b)] += 1
    left = sum(role["segments"][0]["batches"] for p in saved for role in p.roles)
    rows["elastic"] = {"from": a.ranks, "to": new_world, "batches_left": left, "assigned": sum(given.values()),
                       "given_twice": sum(v > 1 for v in given.values()),
                       "resplit_s_per_rank": round((time.perf_counter() - t0) / new_world, 3)}

    print(f"LAION-scale simulation: {a.shards:,} shards x {a.samples:,} samples, {a.ranks} ranks x {a.workers} "
          f"workers, global batch {global_batch} (micro {a.micro} x accum {a.accum}), shuffle block {a.block}")
    print(f"  batches per rank per epoch     {batches:,} on every rank ({rows['steps_per_epoch']:,} steps)")
    print(f"  batches per worker role        {rows['batches_per_role']}  (batches, roles)")
    print(f"  shards per worker role         {rows['shards_per_role']}  (shards, roles)")
    print(f"  repeated samples per role      min/median/max {rows['repeated_per_role']}; per epoch "
          f"{rows['repeated_total']:,} repeated, {rows['unread_total']:,} unread ({rows['repeated_total'] / spe:.2%})")
    print(f"  start-up requests per job      before {before:,} (every rank) | now {now} (rank 0, broadcast) | "
          f"ratio {now / before:.4f}")
    print("  bytes a resume reads again     position | before (replay from epoch start) |       now | ratio   | "
          "bound: the open shards")
    for k, v in resume.items():
        print(f"{k:>41} | {_gb(v['before']):>32} | {_gb(v['now']):>9} | {v['ratio']:.5f} | {_gb(v['bound'])}")
    e = rows["elastic"]
    print(f"  elastic {e['from']} -> {e['to']} ranks at 50%   {e['batches_left']:,} batches left, {e['assigned']:,} "
          f"assigned, {e['given_twice']} twice ({e['resplit_s_per_rank']} s a rank)")
    print(f"  (median shard {_gb(statistics.median(shard_bytes))}; split {split_s:.2f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
