"""python -m launch.precompute_latents --config=configs/precompute.py:PRESET --config.autoencoder_checkpoint=CKPT
       --config.data.root=ROOT --workdir=OUT

Encodes every window of the audio folder ROOT with the autoencoder of CKPT (and the captions with the configured text
encoder) into OUT/shard-*.array_record + OUT/manifest.json (musicdiff.inference.precompute). Run it again after an
interruption to resume; on a finished OUT it does nothing. Multi-host: run the same command on every host with
--config.distributed.enabled=True (and coordinator_address / num_processes / process_id when JAX cannot detect the
cluster).
"""

from launch.common import run
from musicdiff.inference.precompute import precompute_latents

if __name__ == "__main__":
    # Devices are touched only inside the stage, after jax.distributed is initialised (multi-host).
    run(precompute_latents, default_config="configs/precompute.py:tiny", needs_devices=False)
