"""musicdiff.convert: checkpoints of other toolkits to and from musicdiff (stable_audio: stable-audio-tools)."""
