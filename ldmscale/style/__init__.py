"""ldmscale.style: conditioning on a reference image's style (step 2 of a two-step run).

encoder.py     reference image -> K style tokens (variational: mean, log-variance; KL to N(0, I))
attention.py   decoupled, zero-initialised style cross-attention added to every U-Net cross-attention block
refs.py        which image is a sample's reference: an augmented view of itself, or a metadata partner
step1_init.py  the U-Net weights a style run starts from (a step-1 text-only checkpoint)
"""
