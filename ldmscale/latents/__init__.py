"""Precomputed latents: `ldmscale-encode` turns image shards into latent shards once; training reads them.

format.py   one latent sample's bytes (posterior moments, token ids, optional text embeddings)
writer.py   an output shard written atomically to any fsspec URL, skipped when already complete
manifest.py the set's manifest and img2dataset-style _stats.json, and its check against a training config
encode.py   the `ldmscale-encode` console script (distributed over ranks, resumable)

Nothing here is imported by `import ldmscale.latents` beyond format's names: ldmscale.data imports the format
for its decode hook, and encode.py imports ldmscale.data, so the package root must stay light.
"""

from ldmscale.latents.format import LATENT_EXT, collate_latents, decode_latent, encode_latent

__all__ = ["LATENT_EXT", "collate_latents", "decode_latent", "encode_latent"]
