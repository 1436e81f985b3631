"""musicdiff.training."""
