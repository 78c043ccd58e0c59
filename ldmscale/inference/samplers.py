"""The sampler registry: each name of `config.SAMPLERS` -> how to build its diffusers scheduler from the
training noise schedule. ldmscale-sample, in-training grids and evaluation all go through `make_scheduler`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ldmscale.config import SAMPLERS

_BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ddim": lambda c: DDIMScheduler.from_config(c, set_alpha_to_one=False, steps_offset=1),
    "dpmsolver++": lambda c: DPMSolverMultistepScheduler.from_config(c, algorithm_type="dpmsolver++", solver_order=2),
    "euler": lambda c: EulerDiscreteScheduler.from_config(c),
    "ddpm": lambda c: DDPMScheduler.from_config(c),
}
assert tuple(_BUILDERS) == SAMPLERS, "config.SamplerName and the builders must name the same samplers"


def make_scheduler(name: str, train_config: dict[str, Any]) -> Any:
    """A sampling scheduler named `name`, configured like the training DDPMScheduler (`train_config`)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    return _BUILDERS[name]({k: v for k, v in train_config.items() if not k.startswith("_")})
