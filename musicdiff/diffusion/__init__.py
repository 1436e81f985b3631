"""musicdiff.diffusion."""
