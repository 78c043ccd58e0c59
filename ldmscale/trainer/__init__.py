"""ldmscale.trainer: the training loop and what only it uses.

loop.py         `main()`: set-up, then the step loop in labelled paragraphs
cli.py          the `ldmscale-train` command line (`python -m ldmscale.train` starts it)
stages.py       what DeepSpeed trains: the diffusion stage or the autoencoder stage
engine.py       the DeepSpeed engine (and the Engine protocol the loop relies on)
ds_config.py    the DeepSpeed config derived from ours
ema.py          the fp32 EMA of the master weights, sharded like them
posthoc_ema.py  the post-hoc EMA profiles (EDM2) during training: updates, snapshots, resume
monitor.py      W&B, log.jsonl, throughput and MFU
"""
