"""Precomputed latents: `ldmscale-encode` turns image shards into latent shards once; training reads them.

writer.py   an output shard written atomically to any fsspec URL, skipped when already complete
manifest.py the set's manifest and img2dataset-style _stats.json, and its check against a training config
existing.py a set already in --out (encoding.json): encoded by the same config, or refused
encode.py   the `ldmscale-encode` console script (distributed over ranks, resumable)

One latent sample's bytes (posterior moments, token ids, optional text embeddings) are defined where the loader
decodes them: ldmscale/data/latent_format.py.
"""
