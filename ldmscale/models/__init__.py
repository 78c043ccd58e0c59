"""ldmscale.models: the networks and the maths of one training step.

networks.py     U-Net and autoencoder built from a preset (config/presets.py) or a pretrained folder
encoders.py     the frozen VAE and text encoder, outside the DeepSpeed engine
objective.py    the denoising objective (eps or v, min-SNR) around the U-Net; the noise schedule (zero terminal SNR)
noise.py        per-sample draws as pure functions of (seed, global sample index, stream); timestep sampling
immiscible.py   model.immiscible: a micro-batch's noises assigned to its latents by a linear assignment
autoencoder.py  the autoencoder stage's objective (reconstruction + KL) and its latent scaling factor
offline.py      tokenizer, text encoder and VAE folders written with save_pretrained (tests, the demo)
size_conditioning.py  SDXL's size and crop conditioning on the U-Net (diffusers' text_time path), and its baking
"""
