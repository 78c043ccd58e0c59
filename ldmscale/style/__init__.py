"""ldmscale.style: conditioning on a reference image's style (step 2 of a two-step run).

encoder.py     reference image -> K style tokens (variational: mean, log-variance; KL to N(0, I))
attention.py   decoupled, zero-initialised style cross-attention added to every U-Net cross-attention block

Which image is a sample's reference is the data's business (ldmscale/data/style_refs.py); the step-1 weights a
style run starts from are loaded by ldmscale/checkpoint/warm_start.py.
"""
