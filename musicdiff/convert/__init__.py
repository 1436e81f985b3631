"""musicdiff.convert."""
