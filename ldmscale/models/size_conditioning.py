"""SDXL's micro-conditioning on the U-Net (`model.size_conditioning`): the original size, the crop's top-left corner
and the target size of each image, six numbers per sample, through diffusers' own `addition_embed_type="text_time"`
path: each number gets a sinusoidal embedding of `size_embed_dim` channels (diffusers' `Timesteps`, the timestep's
own kind), the six are concatenated and projected by a two-layer MLP (`add_embedding`) onto the timestep
embedding. SDXL concatenates CLIP's pooled text embedding in front of the six; ldmscale conditions on text through
cross-attention only, so that part is empty (`text_embeds` of width 0).

Because the path is diffusers' own, a U-Net's config and state dict carry it (save_pretrained, from_config,
checkpoints, EMA) with no module of ldmscale's. The projection's last layer starts at zero, so adding the path
to a trained square model leaves its output unchanged until training moves it.

A diffusers StableDiffusionPipeline passes no `added_cond_kwargs`; `bake_size_conditioning` folds one fixed
conditioning into the time embedding's bias, giving a plain U-Net that such a pipeline can run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from ldmscale.config import ConfigError
from ldmscale.data.buckets import SizeCond

SIZE_NUMBERS = 6  # original h, w, crop top, left, target h, w


def has_size_conditioning(unet: UNet2DConditionModel) -> bool:
    return unet.config.addition_embed_type == "text_time"


def add_size_conditioning(unet: UNet2DConditionModel, embed_dim: int) -> UNet2DConditionModel:
    """Give `unet` (in place) the size-conditioning path, zero-initialised, and record it in its config so that
    from_config / from_pretrained rebuild it. Every existing weight is kept."""
    if unet.config.addition_embed_type is not None:
        raise ValueError(f"the U-Net already has addition_embed_type={unet.config.addition_embed_type!r}")
    time_embed_dim = unet.time_embedding.linear_2.out_features
    added = {"addition_embed_type": "text_time", "addition_time_embed_dim": embed_dim,
             "projection_class_embeddings_input_dim": SIZE_NUMBERS * embed_dim}
    # diffusers lists the arguments a model was built with by default and rebuilds those with their defaults
    defaulted = [k for k in unet.config.get("_use_default_values", []) if k not in added]
    unet.register_to_config(**added, _use_default_values=defaulted)
    param = next(unet.parameters())
    # what UNet2DConditionModel._set_add_embedding builds for "text_time"
    unet.add_time_proj = Timesteps(embed_dim, unet.config.flip_sin_to_cos, unet.config.freq_shift)
    unet.add_embedding = TimestepEmbedding(SIZE_NUMBERS * embed_dim, time_embed_dim).to(param.device, param.dtype)
    torch.nn.init.zeros_(unet.add_embedding.linear_2.weight)
    torch.nn.init.zeros_(unet.add_embedding.linear_2.bias)
    return unet


def apply_size_config(unet: UNet2DConditionModel, enabled: bool, embed_dim: int) -> UNet2DConditionModel:
    """The U-Net as model.size_conditioning / model.size_embed_dim ask: the path added when missing, kept when a
    fine-tuned folder has it already; a mismatch is refused (the config decides what the step feeds)."""
    if enabled and not has_size_conditioning(unet):
        return add_size_conditioning(unet, embed_dim)
    if has_size_conditioning(unet) != enabled or (enabled and unet.config.addition_time_embed_dim != embed_dim):
        raise ConfigError(
            f"the U-Net has addition_embed_type={unet.config.addition_embed_type!r} "
            f"(addition_time_embed_dim={unet.config.addition_time_embed_dim}), the config asks for "
            f"model.size_conditioning={str(enabled).lower()} with model.size_embed_dim={embed_dim}: make them agree"
        )
    return unet


def size_cond_tensor(conds: Sequence[SizeCond], device: torch.device | str | None = None) -> torch.Tensor:
    """[len(conds), 6] int64, the layout of a batch's "size_cond"."""
    return torch.tensor([c.as_list() for c in conds], dtype=torch.int64, device=device)


def added_cond_kwargs(size_cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, 6] numbers -> the U-Net's `added_cond_kwargs` (an empty pooled-text part; see the module docstring)."""
    time_ids = size_cond.float()
    return {"text_embeds": time_ids.new_zeros(len(time_ids), 0), "time_ids": time_ids}


@torch.no_grad()
def bake_size_conditioning(unet: UNet2DConditionModel, cond: SizeCond) -> UNet2DConditionModel:
    """A plain U-Net (no addition embedding) that computes what `unet` computes under the fixed conditioning
    `cond`: the added embedding does not depend on the sample or timestep, so it is a constant added to the time
    embedding, i.e. to its last layer's bias (exact up to the rounding of one addition)."""
    aug = unet.add_embedding(unet.add_time_proj(torch.tensor(cond.as_list(), dtype=torch.float32)
                                                .to(unet.device)).reshape(1, -1).to(unet.dtype))[0]
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config.update(addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    plain = UNet2DConditionModel.from_config(config).to(unet.device, unet.dtype)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("add_embedding.")}
    state["time_embedding.linear_2.bias"] = state["time_embedding.linear_2.bias"] + aug
    plain.load_state_dict(state, strict=True)
    return plain.eval()
