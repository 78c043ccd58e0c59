"""A style model as a diffusers IP-Adapter: `OUT/ip_adapter/ip-adapter.safetensors` and its image encoder.

ldmscale's style path is the IP-Adapter design (decoupled cross-attention on image tokens, added to the text
attention before to_out), so a clip-backbone model with the `ip_adapter` head maps onto diffusers' format one to
one (diffusers' loaders/ip_adapter.py and unet_loader_utils, IPAdapterAttnProcessor2_0):

- `image_proj.proj.weight|bias`, `image_proj.norm.weight|bias`: ImageProjection (Linear to 4 tokens, LayerNorm per
  token) on the projected `image_embeds` of `image_encoder/` (a CLIPVisionModelWithProjection); both biases are
  zero, as trained, so diffusers' unconditional image branch (all-zero embeddings) gives all-zero tokens, the
  dropped style of training;
- `ip_adapter.{1,3,5,...}.to_k_ip.weight|to_v_ip.weight`: the style keys and values of each cross-attention block,
  numbered as diffusers numbers them (1 + 2 x the index of the block among the U-Net's cross-attention processors,
  in `unet.attn_processors` order).

What the format cannot carry is refused by name (`refusal`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from ldmscale.config import StyleConfig
from ldmscale.style.attention import StyleAttnProcessor, is_style_key
from ldmscale.style.encoder import CLIP_MEAN, CLIP_STD, FrozenVisionBackbone, StyleEncoder

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor

FOLDER = "ip_adapter"
WEIGHT_NAME = "ip-adapter.safetensors"
IMAGE_ENCODER = "image_encoder"
TOKENS = 4  # diffusers' loader reads an ImageProjection ("proj.weight") as 4 tokens


def refusal(cfg: StyleConfig) -> str | None:
    """Why this style model cannot be an IP-Adapter (the setting and what to train instead), or None."""
    if cfg.backbone != "clip":
        return (f"style.backbone={cfg.backbone}: diffusers' IP-Adapter takes a CLIP image encoder; train with "
                f"style.backbone=clip to export one")
    if cfg.clip_head != "ip_adapter":
        return (f"style.clip_head={cfg.clip_head}: diffusers' IP-Adapter projects CLIP's image_embeds; train with "
                f"style.clip_head=ip_adapter (the default)")
    if cfg.uses_colour_stats:
        return "style.colour_stats=true: the IP-Adapter format has no colour-statistics input; train without it"
    if cfg.uses_global_path:
        return "style.global_path=true: the IP-Adapter format has no path into the time embedding; train without it"
    if cfg.num_tokens != TOKENS:
        return (f"style.num_tokens={cfg.num_tokens}: diffusers loads an IP-Adapter image projection as {TOKENS} "
                f"tokens; train with style.num_tokens={TOKENS}")
    return None


def style_processors(unet: UNet2DConditionModel) -> list[StyleAttnProcessor]:
    """The style processors in diffusers' order of cross-attention processors."""
    procs = [p for name, p in unet.attn_processors.items() if not name.endswith("attn1.processor")]
    if not procs or not all(isinstance(p, StyleAttnProcessor) for p in procs):
        raise ValueError("the U-Net has no style path in every cross-attention block")
    return procs


def ip_adapter_state_dict(unet: UNet2DConditionModel, encoder: StyleEncoder) -> dict[str, torch.Tensor]:
    """The weights in the layout of diffusers' `ip-adapter.safetensors` (fp32, contiguous)."""
    proj = encoder.image_proj
    out = {
        "image_proj.proj.weight": proj.proj.weight,
        "image_proj.proj.bias": torch.zeros(proj.proj.out_features),
        "image_proj.norm.weight": proj.norm.weight,
        "image_proj.norm.bias": torch.zeros_like(proj.norm.weight),
    }
    for i, p in enumerate(style_processors(unet)):
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = p.to_k_style.weight
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = p.to_v_style.weight
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def text_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain copy of the U-Net (diffusers' own processors, no style weights) for the text pipeline."""
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if not is_style_key(k)}, strict=True)
    return plain.to(unet.dtype).eval()


def feature_extractor(size: int) -> CLIPImageProcessor:
    """CLIP preprocessing at the image encoder's input size (what FrozenVisionBackbone does to a reference)."""
    # imported here: importing it prints a warning on stderr when torchvision is absent, which would break every
    # export's (and every bad-input line's) one-line stderr
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def write_ip_adapter(unet: UNet2DConditionModel, encoder: StyleEncoder, frozen: FrozenVisionBackbone,
                     out: Path) -> Path:
    """OUT/ip_adapter/ip-adapter.safetensors and OUT/ip_adapter/image_encoder/ (model + preprocessor)."""
    folder = Path(out) / FOLDER
    (folder / IMAGE_ENCODER).mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state_dict(unet, encoder), str(folder / WEIGHT_NAME))
    frozen.model.float().save_pretrained(folder / IMAGE_ENCODER, safe_serialization=True)
    feature_extractor(frozen.size).save_pretrained(folder / IMAGE_ENCODER)
    return folder
