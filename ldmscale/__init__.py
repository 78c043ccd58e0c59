"""ldmscale: a trainer for text- and style-conditioned latent diffusion models at LAION scale."""

__version__ = "0.1.0"
