"""musicdiff.eval."""
