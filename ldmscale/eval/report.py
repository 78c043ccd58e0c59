"""What an eval leaves behind: eval.json, a FID-vs-CLIP-score plot across guidance scales, and W&B."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(out: Path, report: dict[str, Any]) -> Path:
    path = out / "eval.json"
    tmp = path.with_name(".eval.json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    return path


def plot_sweep(results: list[dict[str, Any]], path: Path, title: str, x_key: str = "clip_score",
               x_label: str = "CLIP score (100 x cosine)") -> Path:
    """FID (down is better) against CLIP score (right is better), one point per guidance scale, as NeMo and
    the SD papers draw the trade-off. Without a CLIP score: FID against the guidance scale."""
    import matplotlib  # here: the Agg backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    has_x = all(r.get(x_key) is not None for r in results)
    xs = [r[x_key] if has_x else r["guidance"] for r in results]
    ys = [r["fid"] for r in results]
    ax.plot(xs, ys, "o-")
    for x, y, r in zip(xs, ys, results):
        ax.annotate(f"{r['guidance']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x_label if has_x else "guidance scale")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_wandb(report: dict[str, Any], plot: Path | None, project: str, mode: str, out: Path) -> None:
    """One W&B run per eval (job_type=eval): a table of the sweep, the plot, and the best FID as summary."""
    if mode == "disabled":
        return
    import wandb  # here: a second or more of import time, only for runs that log

    step = report.get("step")
    run = wandb.init(project=project, job_type="eval", mode=mode,  # type: ignore[arg-type]  # checked by the CLI
                     dir=str(out), config=report["settings"], name=f"eval-step{step}" if step is not None else "eval")
    for r in report["results"]:  # one row per scale: W&B can plot FID against eval/guidance or eval/clip_score
        run.log({f"eval/{k}": v for k, v in r.items() if v is not None})
    columns = ["guidance", "fid", "clip_score"]
    run.log({"eval/sweep": wandb.Table(columns=columns,
                                       data=[[r.get(c) for c in columns] for r in report["results"]])})
    if plot is not None:
        run.log({"eval/fid_vs_clip": wandb.Image(str(plot))})
    best = min(report["results"], key=lambda r: r["fid"])
    run.summary.update({"fid_best": best["fid"], "guidance_best_fid": best["guidance"], "checkpoint_step": step})
    run.finish()
