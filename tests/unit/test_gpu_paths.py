"""The GPU paths' decisions, on CPU: which GPU a rank takes, the precision sampling runs in, channels_last conv
weights under ZeRO-0 (trained, averaged and checkpointed as NHWC), and the stale build lock a killed FusedAdam
JIT build leaves behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.file_baton import FileBaton

from ldmscale.checkpoint import CheckpointStore
from ldmscale.checkpoint.loading import inference_dtype
from ldmscale.config import Config, dump_config
from ldmscale.models.networks import build_unet
from ldmscale.runtime.dist import device_index
from ldmscale.trainer.ema import EMA
from ldmscale.trainer.engine import build_engine
from ldmscale.trainer.extensions import load_ops, ops_for
from ldmscale.trainer.stages import Stage


def test_a_rank_takes_its_local_gpu_or_the_only_one_it_sees() -> None:
    assert device_index(3, 8) == 3  # every GPU of the node visible
    assert device_index(3, 1) == 0  # srun --gpus-per-task / gpu-bind: each task sees its own as device 0
    with pytest.raises(RuntimeError, match="only 2 GPUs are visible"):
        device_index(3, 2)


def test_sampling_runs_in_the_training_precision_on_a_gpu(tmp_path: Path) -> None:
    tag_dir = tmp_path / "step_00000001"
    tag_dir.mkdir()
    cfg = Config()
    cfg.deepspeed.precision = "bf16"
    (tag_dir / "config.yaml").write_text(dump_config(cfg))
    (tag_dir / "COMPLETE").write_text("")
    assert inference_dtype("auto", tag_dir, "cuda") == torch.bfloat16
    assert inference_dtype("auto", tag_dir, "cpu") == torch.float32
    assert inference_dtype("fp32", tag_dir, "cuda") == torch.float32
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model_index.json").write_text("{}")
    assert inference_dtype("auto", tmp_path / "export", "cuda") == torch.bfloat16


@pytest.fixture(scope="module")
def zero0_channels_last(single_rank_group: None) -> Iterator[tuple[object, torch.nn.Module, EMA]]:
    torch.manual_seed(0)
    unet = build_unet("tiny", 4, 32, 8)
    cfg = Config()
    cfg.model.channels_last, cfg.deepspeed.zero_stage = True, 0
    stage = Stage(cfg, torch.device("cpu"), torch.float32)
    stage.trained = unet
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine = build_engine(unet, list(unet.parameters()), ds)
    assert stage.channels_last_weights()
    ema = EMA(list(unet.named_parameters()), 0.5, engine.optimizer)
    yield engine, unet, ema


def _step(engine: object, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(2, 16, 32, generator=g)
    loss = engine(x, torch.tensor([3, 500]), encoder_hidden_states=ctx).sample.pow(2).mean()  # type: ignore[operator]
    engine.backward(loss)  # type: ignore[attr-defined]
    engine.step()  # type: ignore[attr-defined]


def test_zero0_trains_averages_and_checkpoints_nhwc_weights(zero0_channels_last: tuple, tmp_path: Path) -> None:
    engine, unet, ema = zero0_channels_last
    convs = [p for p in unet.parameters() if p.dim() == 4]
    initial = {n: p.detach().clone() for n, p in unet.named_parameters()}
    _step(engine, 0)
    ema.update()
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)  # the step kept them
    averaged = ema.state_dict()
    weights = {n: p.detach().clone() for n, p in unet.named_parameters()}
    store = CheckpointStore(tmp_path, keep_last=1)
    tag_dir = store.save(engine, 1, {"step": 1, "world_size": 1}, averaged, "")
    _step(engine, 1)  # move away, then come back
    store.load(engine, tag_dir)
    assert all(torch.equal(p, weights[n]) for n, p in unet.named_parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(torch.equal(averaged[n], torch.lerp(initial[n], weights[n], 0.5)) for n in weights)


class BatonBuilder:
    """An op builder that loads as torch's JIT loader does: take the folder's `lock` baton, or wait for it."""

    def __init__(self, folder: Path) -> None:
        self.name, self.folder, self.loaded = "fused_adam", folder, False

    def load(self) -> None:
        (self.folder / self.name).mkdir(parents=True, exist_ok=True)
        baton = FileBaton(str(self.folder / self.name / "lock"))
        if baton.try_acquire():
            baton.release()  # (the build would run here)
        else:
            baton.wait()
        self.loaded = True


def test_a_killed_builds_stale_lock_does_not_hang_the_next_load(tmp_path: Path) -> None:
    builder = BatonBuilder(tmp_path)
    (tmp_path / "fused_adam").mkdir()
    (tmp_path / "fused_adam" / "lock").write_text("")  # what a rank killed mid-build leaves
    loading = threading.Thread(target=lambda: load_ops([builder], tmp_path), daemon=True)
    loading.start()
    loading.join(timeout=30)
    assert builder.loaded and not (tmp_path / "fused_adam" / "lock").exists()


def test_the_ops_a_config_needs() -> None:
    adam = {"optimizer": {"type": "AdamW", "params": {}}}
    assert [b.name for b in ops_for(adam, cuda=True)] == ["fused_adam"]
    assert ops_for(adam, cuda=False) == []
    assert ops_for({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, cuda=True) == []
    offload = {**adam, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert [b.name for b in ops_for(offload, cuda=False)] == ["cpu_adam"]
