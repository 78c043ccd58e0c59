"""ldmscale.runtime: what every layer may use, and that knows nothing of data or models.

dist.py        the one process-group setup (torchrun, the deepspeed launcher, Slurm) and rank helpers
atomic.py      atomic, durable local writes (temporary name, fsync, rename, fsync the folder)
preemption.py  SIGUSR1/SIGUSR2/SIGTERM -> a flag the loop checks at step boundaries
redact.py      credentials out of anything logged
cli.py         the one error contract of the console scripts: one line on stderr, exit 2
startup.py     a rank's start-up imports with the garbage collector paused, then frozen
"""
