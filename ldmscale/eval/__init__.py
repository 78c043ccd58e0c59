"""Evaluation as MLPerf's Stable Diffusion benchmark does it, and the periodic checks during training.

`ldmscale-eval` (cli.py): prompts (prompts.py) -> images written as they come, each rank its share (generate.py)
-> FID against reference images or statistics (fid.py) and CLIP score (clip_score.py), per guidance scale
-> eval.json, a FID-vs-CLIP plot and W&B (report.py).
"""
