"""launch.describe's report: parameter counts per module and per-device bytes under the configured mesh."""

import ml_collections
from flax import nnx

from musicdiff.parallel import DEFAULT_SHARDING_RULES, mesh_config
from musicdiff.describe import describe_config, format_report
from musicdiff.models import registry


class TwoLayer(nnx.Module):
    def __init__(self, config, rngs):
        init = nnx.initializers.normal(0.02)
        self.inner = nnx.Linear(config.width, 4 * config.width, rngs=rngs,
                                kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
        self.outer = nnx.Linear(4 * config.width, config.width, use_bias=False, rngs=rngs,
                                kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))


registry.register("test_two_layer")(TwoLayer)


def make_config(**mesh):
    config = ml_collections.ConfigDict()
    config.mesh = mesh_config(**mesh)
    config.sharding_rules = DEFAULT_SHARDING_RULES
    config.model = ml_collections.ConfigDict(dict(name="test_two_layer", width=16))
    return config


def test_counts_and_bytes(devices):
    width = 16
    inner = width * 4 * width + 4 * width  # kernel + bias
    outer = 4 * width * width
    report = describe_config(make_config(data=1, fsdp=4, tensor=2))
    model = report["models"]["model"]
    assert model["modules"] == {"inner": inner, "outer": outer}
    assert report["param_count"] == inner + outer
    # Kernels split 8 ways (fsdp x tensor); the bias [64] is replicated.
    assert report["per_device_param_bytes"] == 4 * ((width * 4 * width) // 8 + 4 * width + outer // 8)
    text = format_report(report)
    assert f"{inner + outer:,d}" in text and "fsdp=4" in text


def test_replicated_mesh_keeps_everything_on_each_device(devices):
    report = describe_config(make_config(data=8))
    assert report["per_device_param_bytes"] == 4 * report["param_count"]
