"""Training the embedded evaluator (configs/evaluator.py) on the synthetic set's attributes.

    python -m launch.train_evaluator --config=configs/evaluator.py --config.data.root=ROOT --workdir=DIR

The audio folder is scanned (data_pipelines.audio_folder); every `data.holdout_every`-th usable clip is held out.
Training batches come from the shared Grain pipeline (data_pipelines.grain_pipeline.training_dataset: random
crops, 16 kHz mono, peak-normalised) with the clip's labels attached by record index. The step is pure
(`step(state, batch) -> (state, metrics)`, state = {"params": {"evaluator": ...}, "opt_state", "step"}); the
"evaluator" trainer runs in the stage runner (training/runner.py: sharded init, donated jit step, checkpoints
WORKDIR/checkpoints/<step>/{state, config, data_iter}, preemption, metrics.jsonl + TensorBoard).
Loss: cross-entropy for key, mode and tempo bucket plus binary cross-entropy for instruments (summed). At the
end the held-out clips are scored with the same windowing evaluation uses; DIR/heldout_accuracy.json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from data_pipelines.audio_folder import AudioItem, scan
from data_pipelines.grain_pipeline import AudioFolderSource, training_dataset
from musicdiff.audio.io import load_audio
from musicdiff.audio.windows import prepare_for_analysis
from musicdiff.errors import DataError
from musicdiff.files import atomic_write_json
from musicdiff.metrics import SKIPPED_METRIC
from musicdiff.models import registry
from musicdiff.models.evaluator_analysis import WindowedEvaluator
from musicdiff.models.evaluator_labels import (attribute_scores, encode_targets, prompt_targets,
                                               summarize_attribute_scores)
from musicdiff.training.optim import all_finite, make_optimizer, select_tree
from musicdiff.training.trainer import Trainer, register_trainer

log = logging.getLogger(__name__)
SECTION = "evaluator"
REQUIRED_ATTRIBUTES = ("bpm", "mode", "instruments")


def split_items(items: tuple[AudioItem, ...], holdout_every: int) -> tuple[list[AudioItem], list[AudioItem]]:
    """(train, held out): every holdout_every-th labelled clip is held out (none when holdout_every <= 1)."""
    labelled = [item for item in items if all(k in item.attributes for k in REQUIRED_ATTRIBUTES)
                and ("tonic_pitch_class" in item.attributes or "key" in item.attributes)]
    if not labelled:
        raise DataError("no clip of the audio folder has the synthetic attributes (bpm, key, mode, instruments) the "
                        "evaluator learns; render the embedded set with `python -m launch.prepare_data "
                        "--config=configs/synthetic_data.py --workdir=ROOT`")
    if holdout_every <= 1:
        return labelled, []
    held = [item for i, item in enumerate(labelled) if i % holdout_every == holdout_every - 1]
    train = [item for i, item in enumerate(labelled) if i % holdout_every != holdout_every - 1]
    return train, held


def label_table(items: list[AudioItem], model_config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """{head: [num_items, ...]} labels by record index."""
    rows = [encode_targets(prompt_targets(item.caption, item.attributes), model_config) for item in items]
    return {head: np.stack([row[head] for row in rows]) for head in ("key", "mode", "tempo", "instruments")}


class AttachLabels:
    """Batch of examples -> {audio, key, mode, tempo, instruments}: labels looked up by record index."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        index = np.asarray(batch["index"])
        return dict(audio=np.asarray(batch["audio"], np.float32),
                    **{head: values[index] for head, values in self.table.items()})


def losses(outputs: dict[str, jax.Array], batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    ce = optax.softmax_cross_entropy_with_integer_labels
    terms = {head: ce(outputs[head], batch[head]).mean() for head in ("key", "mode", "tempo")}
    terms["instruments"] = optax.sigmoid_binary_cross_entropy(outputs["instruments"], batch["instruments"]).mean()
    metrics = {f"loss_{name}": value for name, value in terms.items()}
    for head in ("key", "mode", "tempo"):
        metrics[f"acc_{head}"] = jnp.mean(jnp.argmax(outputs[head], axis=-1) == batch[head])
    metrics["acc_instruments"] = jnp.mean((outputs["instruments"] > 0) == (batch["instruments"] > 0.5))
    loss = sum(terms.values())
    metrics["loss"] = loss
    return loss, metrics


def heldout_accuracy(model: nnx.Module, model_config: ml_collections.ConfigDict,
                     items: list[AudioItem]) -> dict[str, float]:
    """Attribute accuracy of `model` on whole held-out clips, windowed as evaluation does."""
    evaluator = WindowedEvaluator(model, model_config)
    per_clip = []
    for item in items:
        audio = prepare_for_analysis(load_audio(item.path, None, None), item.sample_rate, evaluator.sample_rate, 1)
        outputs = evaluator.clip_outputs(audio)
        per_clip.append(attribute_scores(outputs.predictions, prompt_targets(item.caption, item.attributes),
                                         model_config))
    summary = summarize_attribute_scores(per_clip)
    summary["clips"] = float(len(items))
    return summary


@register_trainer("evaluator")
class EvaluatorTrainer(Trainer):
    """The embedded evaluator on the synthetic set's attributes (see the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.freezing = self.freezing.scoped(SECTION)  # the optimiser sees params/evaluator alone
        self.tx = self.freezing.wrap(make_optimizer(config.training))
        self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: registry.build(config[SECTION], nnx.Rngs(0))), nnx.Param)

    def prepare(self, workdir: Path) -> ml_collections.ConfigDict:
        self.train_items, self.heldout_items = split_items(scan(self.config).items,
                                                           int(self.config.data.holdout_every))
        log.info("evaluator data: %d training clips, %d held out", len(self.train_items), len(self.heldout_items))
        return self.config

    def dataset(self, mesh, rules):
        dataset = training_dataset(AudioFolderSource(self.train_items), self.config.data, seed=int(self.config.seed))
        return iter(dataset.map(AttachLabels(label_table(self.train_items, self.config[SECTION]))))

    def batch_spec(self, mesh, rules) -> dict[str, np.ndarray]:
        instruments = len(self.config[SECTION].instruments)
        return dict(audio=np.zeros((1, 1, int(self.config.data.sample_size)), np.float32),
                    key=np.zeros(1, np.int32), mode=np.zeros(1, np.int32), tempo=np.zeros(1, np.int32),
                    instruments=np.zeros((1, instruments), np.float32))

    def init_state(self, key: jax.Array) -> dict[str, Any]:
        params = nnx.state(registry.build(self.config[SECTION], nnx.Rngs(params=key)), nnx.Param)
        self.freezing.check(params)
        return dict(params={SECTION: params}, opt_state=self.tx.init(params), step=jnp.zeros((), jnp.int32))

    def train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[dict[str, Any], dict]:
        def loss_fn(params):
            return losses(nnx.merge(self.graphdef, params)(batch["audio"]), batch)

        params = state["params"][SECTION]
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = self.freezing.zero_frozen(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        finite = all_finite(loss, grads)
        new_params = select_tree(finite, optax.apply_updates(params, updates), params)
        new_state = dict(params={SECTION: new_params}, opt_state=select_tree(finite, opt_state, state["opt_state"]),
                         step=state["step"] + 1)
        metrics.update({"grad_norm": optax.tree.norm(grads), SKIPPED_METRIC: 1.0 - finite.astype(jnp.float32)})
        return new_state, metrics

    def step(self, kind: Hashable):
        return self.train_step

    def finish(self, state: Any, result: Any, workdir: Path) -> dict[str, Any]:
        summary: dict[str, Any] = dict(step=result.step, preempted=result.preempted,
                                       train_clips=len(self.train_items), heldout_clips=len(self.heldout_items))
        if self.heldout_items and not result.preempted:
            model = nnx.merge(self.graphdef, jax.device_get(state["params"][SECTION]))
            summary["heldout"] = heldout_accuracy(model, self.config[SECTION], self.heldout_items)
            atomic_write_json(workdir / "heldout_accuracy.json", summary["heldout"])
        if jax.process_index() == 0:
            print(json.dumps(summary, indent=2))
        return summary


__all__ = ["AttachLabels", "EvaluatorTrainer", "heldout_accuracy", "label_table", "losses", "split_items"]
