"""slice_ldm: thick-to-thin CT slice interpolation by latent diffusion (seed 002)."""
