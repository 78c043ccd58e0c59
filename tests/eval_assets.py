"""A tiny random-init CLIP folder (CLIPModel + CLIPProcessor, save_pretrained) for the evaluation tests.

No CLIP weights can be downloaded here; this folder goes through the same from_pretrained paths as
openai/clip-vit-large-patch14, with the project's offline tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer


def write_tiny_clip(folder: Path, tokenizer_dir: Path, image_size: int = 32, seed: int = 0) -> Path:
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**small, "vocab_size": len(tok), "max_position_embeddings": tok.model_max_length,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {**small, "image_size": image_size, "patch_size": 8}
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    return folder
