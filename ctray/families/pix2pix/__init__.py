"""pix2pix (Isola et al. 2017) on axial CT slices: paired A -> B translation (seed 001)."""
