"""musicdiff.models."""
