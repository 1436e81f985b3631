"""Multi-host plumbing that one process can check: the distributed section and cluster flags, the DCN mesh
refusals, the rows each process reads (and that P processes' rows rebuild the one-process batches exactly, for
contiguous, interleaved and replicated layouts), the topology line, and the start-up failures of a lone process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from data_pipelines.grain_pipeline import process_rows, training_dataset
from data_pipelines.latent_source import latent_training_dataset
from launch.common import apply_cluster_flags
from musicdiff.config import DEFAULT_SHARDING_RULES, load_config, mesh_config, validate
from musicdiff.errors import ConfigError
from musicdiff.parallel import make_mesh
from musicdiff.parallel.distributed import distributed_config, initialize_arguments, topology_summary
from musicdiff.parallel.sharding import process_batch_rows
from tests.precompute_fixtures import write_audio_folder
from tests.process_fixtures import REPO, device_env, free_port
from tests.test_grain_pipeline import folder_source, make_config
from tests.test_latent_source import write_latents


def section(**values):
    config = distributed_config(enabled=True)
    config.update(values)
    return config


def test_initialize_arguments_explicit_and_detected():
    explicit = initialize_arguments(section(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                                            local_device_ids="0,1,2,3", heartbeat_timeout_s=7))
    assert explicit == dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                            local_device_ids=[0, 1, 2, 3], cluster_detection_method=None, initialization_timeout=300,
                            heartbeat_timeout_seconds=7, shutdown_timeout_seconds=300)
    detected = initialize_arguments(section(cluster_detection_method="slurm"))
    assert (detected["coordinator_address"], detected["num_processes"], detected["process_id"],
            detected["local_device_ids"], detected["cluster_detection_method"]) == (None, None, None, None, "slurm")


@pytest.mark.parametrize("values, message", [
    (dict(num_processes=2, process_id=2), r"process_id=2: must be in \[0, num_processes=2\)"),
    (dict(local_device_ids="0,x"), r"local_device_ids='0,x'"),
    (dict(cluster_detection_method="kubernetes"), r"cluster_detection_method='kubernetes'"),
    (dict(heartbeat_timeout_s=0), r"heartbeat_timeout_s=0: must be a positive"),
])
def test_initialize_arguments_refusals(values, message):
    with pytest.raises(ConfigError, match=message):
        initialize_arguments(section(**values))


def test_cluster_flags_fill_the_section_or_are_refused():
    config = ml_collections.ConfigDict(dict(distributed=distributed_config()))
    apply_cluster_flags(config, None, None, None)
    assert not config.distributed.enabled
    apply_cluster_flags(config, "host:1", 2, 1)
    assert (config.distributed.enabled, config.distributed.coordinator_address, config.distributed.num_processes,
            config.distributed.process_id) == (True, "host:1", 2, 1)
    with pytest.raises(ConfigError, match="go together"):
        apply_cluster_flags(config, "host:1", None, None)
    with pytest.raises(ConfigError, match="no distributed section"):
        apply_cluster_flags(ml_collections.ConfigDict(dict(seed=0)), "host:1", 2, 0)


def test_training_configs_carry_the_distributed_section():
    for spec in ("configs/diffusion.py:tiny", "configs/precompute.py:tiny", "configs/autoencoder.py:tiny"):
        config = load_config(str(REPO / spec), ["distributed.heartbeat_timeout_s=9", "mesh.dcn_shape.data=1"])
        assert config.distributed.heartbeat_timeout_s == 9 and not config.distributed.enabled
        validate(config, 8)  # dcn_shape is not taken for a mesh axis


def test_dcn_mesh_refusals(devices):
    # One process on one slice is one DCN granule: a 2-way DCN split has nothing to span.
    with pytest.raises(ConfigError, match=r"spans 2 granules but the devices belong to 1 processes"):
        make_mesh(mesh_config(data=2, fsdp=4, dcn_shape=dict(data=2)))
    with pytest.raises(ConfigError, match=r"dcn_shape.fsdp=3: must be a positive divisor of the axis size"):
        make_mesh(mesh_config(data=2, fsdp=4, dcn_shape=dict(fsdp=3)))
    with pytest.raises(ConfigError, match=r"dcn_shape.model: unknown mesh axis"):
        make_mesh(mesh_config(data=8, dcn_shape=dict(model=1)))
    plain = make_mesh(mesh_config(data=2, fsdp=4, dcn_shape=dict(data=1)))
    assert dict(plain.shape) == dict(data=2, fsdp=4, tensor=1, sequence=1)


def test_one_process_reads_every_row_and_logs_its_topology(devices):
    mesh = make_mesh(mesh_config(data=2, fsdp=4))
    assert process_batch_rows(mesh, DEFAULT_SHARDING_RULES, 16) == tuple(range(16))
    # 'batch' on data only with tensor=2: every row still lives on this process.
    rules = (("batch", "data"),) + tuple(DEFAULT_SHARDING_RULES)
    assert process_batch_rows(make_mesh(mesh_config(data=4, tensor=2)), rules, 8) == tuple(range(8))
    line = topology_summary(mesh)
    assert line.startswith("1 process(es) x 8 local device(s) = 8 cpu device(s)")
    assert "mesh data=2 x fsdp=4 x tensor=1 x sequence=1" in line and line.endswith("0x8")


def test_process_rows_default_and_refusals():
    assert process_rows(4, 1, 2) == ((4, 5, 6, 7), 8)
    assert process_rows(2, None, None, batch_rows=(1, 5), global_batch_size=8) == ((1, 5), 8)
    for rows, size in (((1, 1), 8), ((1, 9), 8), ((1, 2, 3), 8)):
        with pytest.raises(ValueError, match="distinct rows"):
            process_rows(2, None, None, batch_rows=rows, global_batch_size=size)


LAYOUTS = {
    "contiguous": [(0, 1, 2, 3), (4, 5, 6, 7)],
    "interleaved": [(0, 1, 4, 5), (2, 3, 6, 7)],  # e.g. a TPU topology ordering the processes' chips alternately
    "replicated": [tuple(range(8)), tuple(range(8))],  # a batch axis that does not span the processes
}


def assemble(per_process, layout):
    """The global batches rebuilt from each process's rows, as make_array_from_process_local_data places them."""
    out = []
    for batches in zip(*per_process):
        merged = {}
        for name in batches[0]:
            if batches[0][name].dtype.kind not in "biuf":
                continue
            array = np.zeros((8,) + batches[0][name].shape[1:], batches[0][name].dtype)
            for rows, batch in zip(layout, batches):
                array[list(rows)] = batch[name]
            merged[name] = array
        out.append(merged)
    return out


def numeric(batch):
    return {name: value for name, value in batch.items() if value.dtype.kind in "biuf"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_processes_rebuild_the_one_process_latent_batches(tmp_path, layout):
    directory = write_latents(tmp_path / "latents")
    build = lambda **kw: list(latent_training_dataset(directory, latent_length=4, seed=3, shuffle_seed=1,
                                                      num_epochs=3, **kw))
    reference = build(batch_size=8, process_index=0, process_count=1)
    shards = [build(batch_size=len(rows), batch_rows=rows, global_batch_size=8) for rows in LAYOUTS[layout]]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(reference) > 2
    for ours, theirs in zip(assemble(shards, LAYOUTS[layout]), reference):
        for name, value in numeric(theirs).items():
            np.testing.assert_array_equal(ours[name], value, err_msg=name)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_processes_rebuild_the_one_process_audio_batches(tmp_path, layout):
    root = write_audio_folder(tmp_path / "audio")
    one = make_config(root, "data.batch_size=8")
    source = folder_source(one)
    take = lambda dataset: [b for _, b in zip(range(3), dataset)]
    reference = take(training_dataset(source, one.data, seed=2, process_index=0, process_count=1))
    per_process = make_config(root, "data.batch_size=4")
    shards = [take(training_dataset(source, per_process.data, seed=2, batch_rows=rows, global_batch_size=8))
              for rows in LAYOUTS[layout]]
    for ours, theirs in zip(assemble(shards, LAYOUTS[layout]), reference):
        for name, value in numeric(theirs).items():
            np.testing.assert_array_equal(ours[name], value, err_msg=name)


def lone_process(*flags, timeout=120):
    env = {k: v for k, v in device_env(2).items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "launch.train_diffusion", "--config=configs/diffusion.py:tiny",
                           *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_no_detectable_cluster_is_a_one_line_error(tmp_path):
    done, _ = lone_process("--config.distributed.enabled=True", f"--workdir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: config.distributed.enabled: ")
    assert "--coordinator=HOST:PORT --num_processes=N --process_id=I" in done.stderr


def test_a_missing_peer_bounds_the_wait_by_the_initialization_timeout(tmp_path):
    # Process 1 of 2 with no coordinator listening: JAX gives up after the timeout and aborts the process.
    address = f"127.0.0.1:{free_port()}"
    done, seconds = lone_process(f"--coordinator={address}", "--num_processes=2", "--process_id=1",
                                 "--config.distributed.initialization_timeout_s=3", f"--workdir={tmp_path}")
    assert done.returncode != 0
    assert f"process 1 of 2 on {os.uname().nodename}: joining the cluster at {address}" in done.stderr
    assert "DEADLINE_EXCEEDED" in done.stderr
    assert seconds < 90, seconds
