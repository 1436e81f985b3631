"""musicdiff.inference."""
