"""musicdiff.audio."""
