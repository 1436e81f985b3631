"""Data pipelines: audio folders, Grain loading and the procedurally rendered synthetic dataset."""
