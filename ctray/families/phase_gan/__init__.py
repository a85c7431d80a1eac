"""CT contrast-phase translation: ViT encoder, phase-conditioned 3D generator, PatchGAN, GRL."""
