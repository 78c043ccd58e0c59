"""ldmscale-eval's pieces in one process: FID, reference statistics, CLIP score, prompts, input errors.

No Inception or CLIP weights exist here: the CLIP tests use a random-init CLIP folder written with
save_pretrained (the loading path of real weights), FID uses the weight-free pixel features or that CLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPU = torch.device("cpu")


def test_wandb_gets_one_row_per_guidance_scale_and_the_plot(tmp_path: Path) -> None:
    from ldmscale.eval.report import log_wandb, plot_sweep
    from tests.wandb_records import history

    results = [{"guidance": 2.0, "fid": 40.0, "clip_score": 20.0}, {"guidance": 4.0, "fid": 30.0, "clip_score": 25.0}]
    report = {"step": 7, "results": results, "settings": {"features": "pixels:8"}}
    plot = plot_sweep(results, tmp_path / "fid_vs_clip.png", "test")
    log_wandb(report, plot, "ldmscale-test", "offline", tmp_path)
    import wandb

    wandb.teardown()  # the service writes the run file after finish() returns; teardown waits for it
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = history(run_file)
    assert [(r["eval/guidance"], r["eval/fid"], r["eval/clip_score"]) for r in rows if "eval/fid" in r] == [
        (2.0, 40.0, 20.0), (4.0, 30.0, 25.0)]
    assert any(r.get("eval/fid_vs_clip/_type") == "image-file" for r in rows)
    assert any(r.get("eval/sweep/_type") == "table-file" and r["eval/sweep/nrows"] == 2 for r in rows)
