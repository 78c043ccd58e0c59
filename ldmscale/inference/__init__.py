"""ldmscale.inference: images from trained weights.

generate.py   classifier-free guidance sampling (text, and dual text + style), noise keyed by image index
samplers.py   the diffusers schedulers by name
images.py     PNGs, samples.json and a labelled grid (mixed sizes too)
sizes.py      --width/--height and --original-size/--crop/--target-size, checked against the model
prompts.py    the one prompt reader (.txt, .json, .jsonl, .parquet, img2dataset folders)
sample.py     the `ldmscale-sample` console script
export.py     the `ldmscale-export` console script: a StableDiffusionPipeline folder (size conditioning baked in)
"""
