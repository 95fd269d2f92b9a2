"""Latent diffusion over a continuous first stage (diffusers UNet2DModel + schedulers): unconditional
generation and super-resolution by concatenating the encoded low-resolution image (Kim & Kim, CVPR 2024,
"Arbitrary-Scale Image Generation and Upsampling using Latent Diffusion Model and Implicit Neural
Decoder"), with the paper's alignment loss through the first stage's decoder."""
from generators.latent_diffusion.model import (  # noqa: F401
    SHORT_SCHEDULERS,
    LatentDiffusion,
    LatentDiffusionConfig,
    make_scheduler,
)
