"""The loss curves of a run from its log.jsonl: training loss and the validation loss per timestep bucket.

    python -m ldmscale.eval.curves RUN_DIR [--out RUN_DIR/loss_curve.png]

Later lines win for a step (a resumed run logs the steps after its checkpoint again).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ldmscale.eval.validation import BUCKETS


def read_log(run_dir: Path) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """(training loss per step, {validation key: value per step})."""
    train: dict[int, float] = {}
    val: dict[str, dict[int, float]] = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "step" not in row:
            continue
        if "loss" in row:
            train[row["step"]] = row["loss"]
        for key in [f"val/mse_{b}" for b in BUCKETS] + ["val/mse"]:
            if key in row:
                val.setdefault(key, {})[row["step"]] = row[key]
    return train, val


def plot_curves(run_dir: Path, out: Path) -> Path:
    import matplotlib  # here: the Agg backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_log(run_dir)
    if not val:
        raise SystemExit(f"{run_dir}/log.jsonl has no validation loss: train with train.eval_every and data.val_shards")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    steps = sorted(train)
    left.plot(steps, [train[s] for s in steps], lw=0.8, label="training loss (this step's batch)")
    left.plot(sorted(val["val/mse"]), [val["val/mse"][s] for s in sorted(val["val/mse"])], "o-", label="validation mse")
    left.set_xlabel("step")
    left.set_yscale("log")
    left.legend(fontsize=8)
    for key, series in val.items():
        if key != "val/mse":
            xs = sorted(series)
            right.plot(xs, [series[s] for s in xs], "o-", label=key.removeprefix("val/mse_") + " t")
    right.set_xlabel("step")
    right.set_ylabel("validation mse (fixed held-out samples)")
    right.set_yscale("log")
    right.legend(fontsize=8, title="timestep bucket")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="default: RUN_DIR/loss_curve.png")
    a = p.parse_args(argv)
    print(plot_curves(a.run_dir, a.out or a.run_dir / "loss_curve.png"))


if __name__ == "__main__":
    main()
