"""Metrics: W&B on rank 0 (a no-op elsewhere or when disabled), a JSON-lines log, throughput and MFU."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ldmscale.config import Config, public_dict
from ldmscale.models.size_conditioning import added_cond_kwargs, has_size_conditioning
from ldmscale.trainer.engine import Engine

if TYPE_CHECKING:
    from diffusers import ModelMixin

TRAINER_STEP = "trainer/step"  # the x-axis of every W&B chart (define_metric)

# dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets, SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def peak_tflops(configured: float) -> float:
    if configured:
        return configured
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)


def _meta_twin(model: ModelMixin) -> ModelMixin:
    """The same architecture on the meta device (shapes only, no memory): FLOPs are counted where no input
    and no weight can sit on the wrong device, whether the real model is still on the CPU (before DeepSpeed
    moved it), on a GPU, or partitioned by ZeRO-3."""
    with torch.device("meta"):
        return type(model).from_config(model.config)


def training_flops_per_sample(unet: ModelMixin, latent_shape: tuple[int, ...],
                              context_shape: tuple[int, ...]) -> float:
    """Forward FLOPs of the U-Net on one sample, counted by torch, times 3 (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    twin, meta = _meta_twin(unet), torch.device("meta")
    x, ctx = torch.zeros((1, *latent_shape), device=meta), torch.zeros((1, *context_shape), device=meta)
    sized = {"added_cond_kwargs": added_cond_kwargs(torch.zeros(1, 6, device=meta))} if has_size_conditioning(twin) \
        else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        twin(x, torch.zeros(1, dtype=torch.long, device=meta), encoder_hidden_states=ctx, **sized)
    return 3.0 * counter.get_total_flops()


def encode_flops_per_sample(vae: ModelMixin, resolution: int) -> float:
    """FLOPs of the frozen VAE encoding one image (latents computed on the fly; no backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    twin = _meta_twin(vae)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        twin.encode(torch.zeros(1, 3, resolution, resolution, device="meta"))
    return float(counter.get_total_flops())


class Monitor:
    """Rank 0 logs; other ranks get the same object and every call is a no-op, so callers never branch."""

    def __init__(self, cfg: Config, out_dir: Path, is_main: bool) -> None:
        self.is_main = is_main
        self.out_dir = out_dir
        self.run: Any = None
        if not is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "log.jsonl", "a")
        if cfg.wandb.mode != "disabled":
            import wandb

            id_file = out_dir / "wandb_run_id"
            # the same run continues across preemptions and requeues
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=cfg.wandb.name or None,
                tags=cfg.wandb.tags or None, id=run_id, resume="allow", mode=cfg.wandb.mode,
                dir=str(out_dir), config=public_dict(cfg),
            )
            # Charts are drawn against the trainer's step; W&B's own step only has to grow. A run resumed after a
            # crash replays the steps after its checkpoint: logged at W&B steps past the last one used, they are
            # kept (W&B drops a step that does not increase), so the curves have no hole. The last W&B step is kept
            # in a file too: a resumed offline run starts counting at 0 again.
            self.run.define_metric(TRAINER_STEP)
            self.run.define_metric("*", step_metric=TRAINER_STEP)
            self.wandb_step_file = out_dir / "wandb_step"
            last = int(self.wandb_step_file.read_text()) if self.wandb_step_file.exists() else -1
            self._next_wandb_step = max(int(self.run.step or 0), last + 1)
            self._wandb_step, self._trainer_step = 0, -1

    def _wandb_step_for(self, step: int) -> int:
        """The W&B step of trainer step `step`: a new one for each trainer step logged, never one used before."""
        if step != self._trainer_step:
            self._wandb_step, self._trainer_step = self._next_wandb_step, step
            self._next_wandb_step += 1
            self.wandb_step_file.write_text(str(self._wandb_step))
        return self._wandb_step

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            self.run.log({**numbers, TRAINER_STEP: step}, step=self._wandb_step_for(step))

    def record(self, key: str, value: dict[str, Any]) -> None:
        """A description of the run made at start (the data plan): a log.jsonl line and a key of the W&B run config."""
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({key: value, "time": time.time()}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.config.update({key: value}, allow_val_change=True)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.is_main and self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption), TRAINER_STEP: step},
                         step=self._wandb_step_for(step))

    def event(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)
            self.jsonl.write(json.dumps({"event": text, "time": time.time()}) + "\n")
            self.jsonl.flush()

    def log_step(self, step: int, stats: StepStats, *, stop_requested: bool, engine: Engine, loader: Any,
                 timer: StepTimer, samples_seen: int, max_steps: int, log_every: int, world: int,
                 flops_per_sample: float, peak: float) -> bool:
        """Every rank calls it once per step: one all-reduce carries the step's loss, its parts and this rank's
        stop request; rank 0 logs the global means (every step) and prints a console line every `log_every`
        steps. Returns True when any rank asked to stop (preemption), so all ranks stop at the same step."""
        # the data's accounting rides along (drops, a mixture's draws per source), so W&B shows the whole job's
        data = loader.accounting_vector()
        vec = torch.cat([stats.vector().double(), torch.tensor([float(stop_requested), *data], dtype=torch.float64,
                                                                 device=stats.losses[0].device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(vec)
        values = vec.tolist()  # the step's one host sync
        # the job's sums; past the shard-failure budget every rank stops alike, at the same step
        tally = loader.read_accounting(values[len(values) - len(data):])
        values = values[: len(values) - len(data)]
        stop = values[-1] > 0
        loss, *parts = (v / world for v in values[:-1])
        metrics: dict[str, Any] = {"loss": loss, "lr": engine.get_lr()[0], "samples_seen": samples_seen,
                                   "epoch": loader.position.epoch, **dict(zip(stats.parts, parts))}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if step % log_every == 0 or step == max_steps:
            metrics.update(timer.summary(world, flops_per_sample, peak))
            metrics.update(loader.accounting.metrics(tally))
            if self.is_main:
                print(
                    f"step {step}/{max_steps} | loss {loss:.4f} | lr {metrics['lr']:.2e}"
                    + (f" | gnorm {metrics['grad_norm']:.3f}" if "grad_norm" in metrics else "")
                    + f" | {metrics['images_per_s']:.1f} img/s | data wait {100 * metrics['data_wait_frac']:.0f}%"
                    + (f" | MFU {100 * metrics['mfu']:.1f}%" if "mfu" in metrics else ""),
                    flush=True,
                )
            timer.reset()
        self.log(metrics, step)
        return stop

    def finish(self) -> None:
        if self.is_main:
            self.jsonl.close()
            if self.run is not None:
                self.run.finish()


class StepStats:
    """One optimizer step's loss and loss parts, kept on the device as tensors: no host sync per micro-batch."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, loss: torch.Tensor, parts: dict[str, Any]) -> None:
        self.losses.append(loss.detach().float())
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(torch.as_tensor(v).detach().float().to(loss.device))

    def vector(self) -> torch.Tensor:
        """[mean loss, mean part...] over the step's micro-batches."""
        means = [torch.stack(self.losses).mean()] + [torch.stack(v).mean() for v in self.parts.values()]
        return torch.stack(means)


class StepTimer:
    """Splits wall time into waiting for data and everything else, between log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0

    def measure_wait(self) -> _Wait:
        return _Wait(self)

    def summary(self, world: int, flops_per_sample: float, peak: float) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        images_per_s = self.samples / elapsed
        out = {
            "images_per_s": images_per_s,
            "images_per_s_per_device": images_per_s / world,
            "data_wait_frac": self.data_wait / elapsed,
        }
        if peak and flops_per_sample:
            out["mfu"] = images_per_s * flops_per_sample / (peak * 1e12 * world)
        return out


class _Wait:
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.data_wait += time.perf_counter() - self.t0


def rank_keys_file(out_dir: Path, rank: int) -> Path:
    return out_dir / "sample_keys" / f"rank{rank:05d}.jsonl"
