"""MetricLogger: metrics.jsonl, one-step-late fetching, TensorBoard media; NanGuard."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from musicdiff.metrics import MetricLogger, NanGuard, NonFiniteLossError, read_metrics


class Probe:
    """A stand-in for a device scalar that records when the host reads it."""

    def __init__(self, value):
        self.value = value
        self.fetched = False

    def __array__(self, dtype=None, copy=None):
        self.fetched = True
        return np.asarray(self.value, dtype=dtype)


def lines(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_metrics_are_fetched_one_step_late(tmp_path):
    logger = MetricLogger(tmp_path, progress=False, tensorboard=False)
    first, second = Probe(1.5), Probe(0.75)
    assert logger.push(1, {"loss": first}) is None
    assert not first.fetched and lines(tmp_path) == []
    assert logger.push(2, {"loss": second}) == {"loss": 1.5}  # step 2 dispatched: step 1 is read now
    assert first.fetched and not second.fetched
    assert [r["step"] for r in lines(tmp_path)] == [1]
    assert logger.flush() == {"loss": 0.75}
    assert second.fetched and [r["step"] for r in lines(tmp_path)] == [1, 2]
    logger.close()


def test_jsonl_records_full_precision_and_rates(tmp_path):
    precise = 0.1 + 1e-12
    with MetricLogger(tmp_path, progress=False, tensorboard=False) as logger:
        logger.push(10, {"loss": jnp.asarray(0.25, jnp.float32), "lr": precise, "grad_norm": np.float64(3.0)})
        logger.push(11, {"loss": jnp.asarray(0.5), "lr": precise, "grad_norm": 2.0})
    records = lines(tmp_path)
    assert records[0] == {"step": 10, "loss": 0.25, "lr": precise, "grad_norm": 3.0}
    assert records[1]["step"] == 11 and records[1]["lr"] == precise and records[1]["steps_per_sec"] > 0
    with MetricLogger(tmp_path, progress=False, tensorboard=False) as logger:  # a resume appends
        logger.push(11, {"loss": 9.0})
    assert [r["step"] for r in lines(tmp_path)] == [10, 11, 11]
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"] == 9.0  # the later line wins


def test_log_every_and_shape_check(tmp_path):
    with MetricLogger(tmp_path, log_every=2, progress=False, tensorboard=False) as logger:
        for step in range(1, 6):
            logger.push(step, {"loss": float(step)})
    assert [r["step"] for r in lines(tmp_path)] == [2, 4]
    logger = MetricLogger(tmp_path / "bad", progress=False, tensorboard=False)
    logger.push(1, {"loss": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"metric 'loss' has shape \(3,\)"):
        logger.flush()
    logger.close()


def test_nan_guard_halts_after_k_in_a_row_and_resets():
    guard = NanGuard(max_consecutive=3)
    assert guard.check(1, {"loss": 1.0})
    assert not guard.check(2, {"loss": math.nan})
    assert not guard.check(3, {"loss": math.inf})
    assert guard.check(4, {"loss": 0.5}) and guard.consecutive == 0  # a finite step resets the run
    assert not guard.check(5, {"loss": math.nan})
    assert not guard.check(6, {"loss": math.nan, "kl": 1.0})
    with pytest.raises(NonFiniteLossError, match=r"step 7: update skipped for 3 consecutive steps \(non-finite kl, "
                                                 r"loss; since step 4; 5 skipped in all\)"):
        guard.check(7, {"loss": math.nan, "kl": -math.inf})
    watched = NanGuard(max_consecutive=1, keys=["loss"])
    assert watched.check(1, {"loss": 1.0, "disc_loss": math.nan})  # unwatched metrics are ignored
    with pytest.raises(NonFiniteLossError, match="step 2"):
        watched.check(2, {"loss": math.nan})


def test_nan_guard_counts_skipped_updates_with_a_finite_loss():
    """A step with a finite loss whose gradients were not finite is skipped by the trainer (update_skipped = 1): the
    guard counts it like a non-finite loss, so such a run cannot skip forever."""
    guard = NanGuard(max_consecutive=2)
    assert guard.check(1, {"loss": 1.0, "update_skipped": 0.0})
    assert not guard.check(2, {"loss": 1.0, "update_skipped": 1.0}) and guard.total == 1
    with pytest.raises(NonFiniteLossError, match=r"step 3: update skipped for 2 consecutive steps \(non-finite "
                                                 r"gradients \(finite loss\); since step 1"):
        guard.check(3, {"loss": 0.5, "update_skipped": 1.0})


def test_logger_guard_writes_the_bad_values_then_raises(tmp_path):
    logger = MetricLogger(tmp_path, progress=False, tensorboard=False, nan_guard=NanGuard(max_consecutive=2))
    logger.push(1, {"loss": jnp.asarray(1.0)})
    logger.push(2, {"loss": jnp.asarray(jnp.nan)})
    logger.push(3, {"loss": jnp.asarray(-jnp.inf)})
    with pytest.raises(NonFiniteLossError, match="step 3"):
        logger.push(4, {"loss": jnp.asarray(0.0)})  # step 3 is read (and the guard trips) once step 4 is queued
    logger.close(process_pending=False)
    assert [r["loss"] for r in lines(tmp_path)] == [1.0, "NaN", "-Infinity"]
    restored = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(restored[1]["loss"]) and restored[2]["loss"] == -math.inf


def test_tensorboard_scalars_images_audio(tmp_path):
    with MetricLogger(tmp_path, progress=True, total_steps=3) as logger:
        logger.push(1, {"loss": 2.0})
        logger.push(2, {"loss": 1.0})
        logger.write_image(2, "recon/spectrogram", np.zeros((16, 32, 3), np.uint8))
        t = np.arange(4410) / 44100
        stereo = np.stack([np.sin(2 * np.pi * 440 * t), 1.5 * np.sin(2 * np.pi * 220 * t)])
        logger.write_audio(2, "recon/audio", stereo, 44100)
        logger.write_spectrogram(2, "recon/mel", stereo, 44100)
        logger.write_text(2, "config", "lr: 1e-4")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 1000
    assert [r["step"] for r in lines(tmp_path)] == [1, 2]


def test_only_the_main_process_writes(tmp_path):
    with MetricLogger(tmp_path / "worker", is_main_process=False, nan_guard=NanGuard(1)) as logger:
        logger.push(1, {"loss": 1.0})
        logger.write_image(1, "x", np.zeros((2, 2, 3), np.uint8))
        with pytest.raises(NonFiniteLossError):  # the guard still runs everywhere
            logger.push(2, {"loss": math.nan})
            logger.push(3, {"loss": 1.0})
    assert not (tmp_path / "worker").exists()
