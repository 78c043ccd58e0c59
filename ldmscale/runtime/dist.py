"""Process-group setup from torchrun, the deepspeed launcher or Slurm, and the few helpers every file uses."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as tdist

from ldmscale.runtime.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def world_info_from_env() -> tuple[int, int, int]:
    """(rank, world, local rank) from torchrun/deepspeed variables, else Slurm's, else a single process.

    Fills in the rendezvous variables torch needs, so plain `python -m ldmscale.train` never falls into
    DeepSpeed's MPI discovery (which fails without mpi4py).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    elif "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        local = int(os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        # a job-specific port, so two jobs sharing a node do not collide
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        rank, world, local = 0, 1, 0
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return rank, world, local


def _skip_cpu_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce on every rank at start-up (45-100 s on a
    fresh machine, and concurrent jobs sharing an extension cache rebuild it under each other). It only speeds
    up CPU inference all-reduce; gloo's collectives are all CPU training needs, so mark the op unavailable.

    `deepspeed.ops.__compatible_ops__` is computed on first access by probing every op builder (a C compile and link
    of a libaio test program among them: six programs per rank). Its only reader at run time is DeepSpeed's
    shared-memory all-reduce (deepspeed.comm.torch.build_shm_op, `.get(name, False)`), so when nothing has probed
    yet the answer is given without the probe."""
    import deepspeed.ops

    if "__compatible_ops__" in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def device_index(local_rank: int, visible: int) -> int:
    """The GPU a rank uses among the `visible` ones. A node's tasks see every GPU (index = local rank), or each
    task sees only its own (srun --gpus-per-task, gpu-bind: device 0 for every local rank)."""
    if visible <= 0:
        raise RuntimeError("CUDA reports no visible device")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(f"local rank {local_rank} but only {visible} GPUs are visible to this task: start one task "
                       f"per GPU (srun --ntasks-per-node = GPUs per node), or give each task its own GPU")


def init_distributed(timeout_min: float = 30.0, engine: Literal["deepspeed", "torch"] = "deepspeed") -> DistInfo:
    """The one process-group setup (NCCL on GPUs, gloo on CPU). engine="deepspeed" (training): through DeepSpeed,
    which keeps its own handles on the group; "torch" (evaluation, no DeepSpeed engine): torch's own, and none at
    all for a single process."""
    rank, world, local = world_info_from_env()
    if torch.cuda.is_available():
        index = device_index(local, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    if not tdist.is_initialized() and engine == "deepspeed":
        import deepspeed

        if device.type == "cpu":
            _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
    elif not tdist.is_initialized() and world > 1:
        tdist.init_process_group(backend, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def cleanup() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", "0"))


def print0(*args: object, **kwargs: object) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]


def comm_device() -> torch.device:
    """Where the process group's collectives take their tensors: the current GPU under NCCL, else the CPU."""
    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if it is true on any rank (a collective: every rank must call it)."""
    if not tdist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (a collective; the others pass anything, e.g. None)."""
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, device=comm_device())
    return box[0]


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def on_rank0(fn: Callable[[], T]) -> T:
    """fn() run by rank 0 alone, its result on every rank (one broadcast). An input error it raises is raised on
    every rank, so all of them print the same line and exit together instead of waiting for rank 0."""
    if not tdist.is_initialized():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if tdist.get_rank() == 0:
        try:
            outcome = (True, fn())
        except InputError as e:
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value
