"""Stable Audio 3 LoRA files against the vendored reference (tests/reference/sa3, spec §8): the tiny SA3 DiT of
test_sa3_dit.py (every weight redrawn) adapted by the reference's own add_lora on the DiT and the conditioner, its
LoRA tensors redrawn non-zero and saved with its save_lora_safetensors, is matched by our converted DiT with the
imported adapter (strengths 1 and 0.5); the reference's loader, given our exported file, adapts the same layers by the
same tensors. Hand-written files check the refusals (NaN, unknown adapter types, layers and shapes, pickles)."""

import json
from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from musicdiff.convert.sa3_lora import (LayerMap, convert_sa3_lora_file, export_sa3_lora, export_sa3_lora_file,
                                        import_sa3_lora, read_sa3_lora)
from musicdiff.errors import ConfigError, DataError
from musicdiff.models.weight_adapters import apply_adapters, layer_tensors, load_adapter, save_adapter

torch = pytest.importorskip("torch")
from test_sa3_dit import (TIMES, inputs, our_condition, ours, reference_output,  # noqa: E402
                          reference_package, reference_wrapper, sa3, sa3_tiny)

pytestmark = pytest.mark.usefixtures("unsharded")
assert reference_package and sa3  # fixtures, used by name

RANK, ALPHA = 4, 8.0  # scaling 2, so a missed alpha shows
# The reference's include filters (substrings, bracket ranges, over DiTWrapper and MultiConditioner module names):
# self- and cross-attention, the feed-forward output, a 1x1 conv, an embedding MLP and the seconds conditioner's Linear.
INCLUDE = ["layers.[0-1].self_attn.to_qkv", "layers.1.cross_attn.to_kv", "ff.ff.2", "preprocess_conv",
           "to_global_embed.0", "embedding.1"]
LAYERS = 8  # the modules INCLUDE selects: 2 + 1 + 2 + 1 + 1 + 1
QKV = "model.transformer.layers.0.self_attn.to_qkv"  # (5·128, 128)
SECONDS_LINEAR = "conditioners.seconds_total.embedder.embedding.1"  # (64, 256)


def add_reference_lora(sa3, wrapper, adapter_type):
    """The reference loader's add_lora on the DiT and the conditioner; every LoRA tensor redrawn non-zero and
    rounded to float16, so that the reference file holds exactly the tensors the model uses."""
    lora = sa3.models.lora
    options = dict(rank=RANK, lora_alpha=ALPHA, adapter_type=adapter_type)
    config = {torch.nn.Linear: {"weight": partial(lora.LoRAParametrization.from_linear, **options)},
              torch.nn.Conv1d: {"weight": partial(lora.LoRAParametrization.from_conv1d, **options)}}
    for part in (wrapper.model, wrapper.conditioner):
        lora.add_lora(part, config, include=INCLUDE)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in wrapper.named_parameters():
            if not lora.name_is_lora(name):
                continue
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("magnitude"):
                value = param * (1 + 0.2 * noise)
            elif name.endswith("lora_A"):
                value = noise / param.shape[1] ** 0.5
            else:  # lora_B, M_xs
                value = 0.3 * noise / RANK ** 0.5
            param.copy_(value.half().float())
    assert len(lora.get_lora_layers(wrapper)) == LAYERS


def save_reference_lora(sa3, wrapper, adapter_type, path):
    lora = sa3.models.lora
    state = lora.get_lora_state_dict(wrapper.model) | lora.get_lora_state_dict(wrapper.conditioner)
    lora.save_lora_safetensors(state, {"rank": RANK, "alpha": ALPHA, "adapter_type": adapter_type, "dropout": 0.0,
                                       "include": INCLUDE, "exclude": None}, path)


def our_output(model, conditioner, adapter_file, strength, batch):
    """Our converted DiT and conditioner with the adapter file applied to their parameters."""
    modules = {"model": model, "conditioner": conditioner}
    entry, weights = load_adapter(adapter_file, modules, strength=strength)
    split = {name: nnx.split(module, nnx.Param, ...) for name, module in modules.items()}
    adapted = apply_adapters({name: params for name, (_, params, _) in split.items()}, [entry], [weights])
    model, conditioner = (nnx.merge(split[name][0], adapted[name], split[name][2]) for name in modules)
    return np.asarray(model(jnp.asarray(batch["x"]), jnp.asarray(TIMES), our_condition(conditioner, batch)))


def base_params(model, conditioner):
    return {"model": nnx.state(model, nnx.Param), "conditioner": nnx.state(conditioner, nnx.Param)}


@pytest.fixture(scope="module")
def converted(reference_package):
    """(config, our DiT, our conditioner) converted from the reference's redrawn weights, once for the module: the
    adapters are applied to copies of their parameters, and reference_wrapper redraws the same weights every time."""
    config = sa3_tiny(differential=True)
    model, conditioner, _ = ours(config, reference_wrapper(reference_package, config))
    return config, model, conditioner


@pytest.mark.parametrize("adapter_type", ["lora", "dora-rows", "lora-xs"])
def test_reference_lora_imports_and_exports_with_parity(sa3, converted, adapter_type, tmp_path, measurement):
    config, model, conditioner = converted
    wrapper = reference_wrapper(sa3, config)
    batch = inputs(config)
    base, _ = reference_output(sa3, wrapper, batch, inpaint=False)
    add_reference_lora(sa3, wrapper, adapter_type)
    reference_file = tmp_path / "reference.safetensors"
    save_reference_lora(sa3, wrapper, adapter_type, reference_file)

    adapter_file = convert_sa3_lora_file(reference_file, tmp_path / "adapter.safetensors", config,
                                         base_params(model, conditioner))
    expected = {}
    for strength in (1.0, 0.5):
        sa3.models.lora.set_lora_strength(wrapper, strength)
        expected[strength], _ = reference_output(sa3, wrapper, batch, inpaint=False)
        scale = float(np.max(np.abs(expected[strength])))
        moved = float(np.max(np.abs(expected[strength] - base))) / scale
        error = float(np.max(np.abs(our_output(model, conditioner, adapter_file, strength, batch)
                                    - expected[strength]))) / scale
        measurement(f"{adapter_type} strength {strength}: max|ours - ref| / max|ref| (the LoRA moves the output by "
                    f"{moved:.2f} of max|ref|)", error)
        assert moved > 0.05  # the adapter changes what is compared
        assert error <= 1e-4

    # Export: the reference's own loader, on a fresh copy of the base, adapts the same layers by the same tensors.
    # The base goes in as the function the CLI passes (read only when LoRA-XS needs it), import took the mapping.
    exported = export_sa3_lora_file(adapter_file, tmp_path / "exported.safetensors", config,
                                    lambda: base_params(model, conditioner))
    original, ours_again = load_file(str(reference_file)), load_file(str(exported))
    assert set(ours_again) == set(original)
    for key, value in original.items():
        assert ours_again[key].dtype == np.float16
        np.testing.assert_array_equal(ours_again[key], value)
    fresh = reference_wrapper(sa3, config)
    sa3.models.lora.load_and_apply_loras(fresh, [str(exported)], "diffusion_cond")
    assert len(sa3.models.lora.get_lora_layers(fresh)) == LAYERS  # its include selects these layers, no other
    got, _ = reference_output(sa3, fresh, batch, inpaint=False)
    error = float(np.max(np.abs(got - expected[1.0]))) / float(np.max(np.abs(expected[1.0])))
    measurement(f"{adapter_type} exported, loaded by the reference: max|got - ref| / max|ref|", error)
    assert error <= 1e-4


# ---- hand-written files ----------------------------------------------------------------------------------------


def lora_key(module, tensor):
    return f"{module}.parametrizations.weight.0.{tensor}"


def write_file(path, tensors, **lora_config):
    save_file({key: np.asarray(value, np.float16) for key, value in tensors.items()}, str(path),
              metadata={"lora_config": json.dumps({"rank": RANK, "alpha": ALPHA, **lora_config})})
    return path


def lora_tensors(seed=0, module=QKV, fan_in=128, fan_out=640):
    rng = np.random.default_rng(seed)
    return {lora_key(module, "lora_A"): rng.normal(size=(RANK, fan_in)),
            lora_key(module, "lora_B"): rng.normal(size=(fan_out, RANK))}


@pytest.fixture(scope="module")
def config(converted):
    return converted[0]


def test_float16_file_round_trips_exactly(config, tmp_path):
    tensors = lora_tensors() | lora_tensors(1, SECONDS_LINEAR, 256, 64)
    rng = np.random.default_rng(2)
    tensors |= {lora_key(QKV, "magnitude"): rng.uniform(1, 2, 640),
                lora_key(SECONDS_LINEAR, "magnitude"): rng.uniform(1, 2, 64)}
    source = write_file(tmp_path / "source.safetensors", tensors, adapter_type="dora-rows")
    adapter_config, weights = import_sa3_lora(source, config)
    assert adapter_config.kind == "dora" and adapter_config.scaling == ALPHA / RANK
    assert adapter_config.include == ("conditioner/conditioners/seconds_total/kernel",
                                      "model/transformer/layers/0/self_attn/to_qkv")
    ours_file = save_adapter(tmp_path / "ours.safetensors", adapter_config, weights)
    exported = export_sa3_lora_file(ours_file, tmp_path / "exported.safetensors", config)
    stored, written = load_file(str(source)), load_file(str(exported))
    assert set(stored) == set(written)
    for key in stored:
        np.testing.assert_array_equal(written[key].view(np.uint16), stored[key].view(np.uint16))
    _, metadata = read_sa3_lora(exported)
    assert metadata == {"rank": RANK, "alpha": ALPHA, "adapter_type": "dora-rows", "dropout": 0.0,
                        "include": [SECONDS_LINEAR, QKV], "exclude": None}
    # A float32 value beyond float16's range is refused by key, not written as inf.
    weights["model"]["transformer"]["layers"]["0"]["self_attn"]["to_qkv"]["lora_b"][0, 0] = 1e6
    with pytest.raises(DataError, match=rf"tensor {QKV}\.parametrizations\.weight\.0\.lora_B .*beyond the range"):
        export_sa3_lora(tmp_path / "overflow.safetensors", adapter_config, weights, config)


def test_legacy_dora_and_ckpt_files(config, tmp_path):
    magnitude = np.random.default_rng(4).uniform(1, 2, (640, 1))  # old files' per-output (out, 1) magnitudes
    tensors = lora_tensors() | {lora_key(QKV, "magnitude"): magnitude}
    adapter_config, weights = import_sa3_lora(write_file(tmp_path / "rows.safetensors", tensors, adapter_type="dora"),
                                              config)
    layer = layer_tensors(weights)["model/transformer/layers/0/self_attn/to_qkv"]
    assert adapter_config.kind == "dora" and layer["magnitude"].shape == (640,)
    np.testing.assert_array_equal(layer["magnitude"], magnitude[:, 0].astype(np.float16))
    columns = lora_tensors() | {lora_key(QKV, "magnitude"): np.ones((1, 128))}  # (1, in): the reference's dora-cols
    with pytest.raises(ConfigError, match=r"adapter_type='dora-cols'.*supported: lora, dora-rows, lora-xs"):
        import_sa3_lora(write_file(tmp_path / "cols.safetensors", columns, adapter_type="dora"), config)

    # A .ckpt of plain tensors and values reads as the same adapter; one holding any other object is not unpickled.
    plain = lora_tensors()
    checkpoint = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {k: torch.tensor(v, dtype=torch.float16) for k, v in plain.items()},
                "lora_config": {"rank": RANK, "alpha": ALPHA, "adapter_type": "lora"}}, checkpoint)
    from_ckpt = import_sa3_lora(checkpoint, config)
    from_safetensors = import_sa3_lora(write_file(tmp_path / "plain.safetensors", plain, adapter_type="lora"), config)
    assert from_ckpt[0] == from_safetensors[0]
    for got, want in zip(layer_tensors(from_ckpt[1]).values(), layer_tensors(from_safetensors[1]).values()):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "lora_config": {}, "callback": partial(print, "unpickled")}, pickled)
    with pytest.raises(DataError, match=r"cannot be read with torch\.load\(weights_only=True\)"):
        import_sa3_lora(pickled, config)


def test_bad_files_are_refused_by_key(config, tmp_path):
    nan = lora_tensors()
    nan[lora_key(QKV, "lora_B")][3, 1] = np.nan
    with pytest.raises(DataError, match=rf"tensor {QKV}\.parametrizations\.weight\.0\.lora_B .*1 NaN"):
        import_sa3_lora(write_file(tmp_path / "nan.safetensors", nan, adapter_type="lora"), config)
    with pytest.raises(ConfigError, match=r"adapter_type='bora' .*supported: lora, dora-rows, lora-xs"):
        import_sa3_lora(write_file(tmp_path / "bora.safetensors", lora_tensors(), adapter_type="bora"), config)
    absent = "model.transformer.layers.7.self_attn.to_qkv"
    with pytest.raises(ConfigError, match=rf"key {absent}\.parametrizations\.weight\.0\.lora_A adapts {absent}, "
                                          r"which this diffusion model has no adaptable layer"):
        import_sa3_lora(write_file(tmp_path / "absent.safetensors", lora_tensors(module=absent),
                                   adapter_type="lora"), config)
    narrow = lora_tensors(fan_out=384)
    with pytest.raises(ConfigError, match=rf"key {QKV}\.parametrizations\.weight\.0\.lora_B has shape \(384, 4\)"):
        import_sa3_lora(write_file(tmp_path / "narrow.safetensors", narrow, adapter_type="lora"), config)
    half = {lora_key(QKV, "lora_A"): lora_tensors()[lora_key(QKV, "lora_A")]}
    with pytest.raises(ConfigError, match=rf"key {QKV}\.parametrizations\.weight\.0\.lora_B is missing"):
        import_sa3_lora(write_file(tmp_path / "half.safetensors", half, adapter_type="lora"), config)
    core = {lora_key(QKV, "M_xs"): np.ones((RANK, RANK))}
    with pytest.raises(ConfigError, match=r"lora-xs file stores only its cores M_xs.*pass the converted diffusion"):
        import_sa3_lora(write_file(tmp_path / "xs.safetensors", core, adapter_type="lora-xs"), config)


def test_every_reference_layer_maps_to_one_of_ours(sa3, config):
    """The Linear / Conv1d modules the reference adapts in this DiT and conditioner (2 blocks × 9 + 12 + 1, spec
    §8.1's count at depth 2) map one to one onto our adapter layers, each a plain transposed kernel."""
    wrapper = reference_wrapper(sa3, config)
    adaptable = {name for part in (wrapper.model, wrapper.conditioner) for name, module in part.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d))}
    layers = LayerMap(config)
    assert set(layers.targets) == adaptable and len(adaptable) == 2 * 9 + 12 + 1
    assert len(set(layers.modules)) == len(layers.targets)
    for module in layers.targets:
        layers.checked_target(module, module, "test")
    assert layers.targets["model.preprocess_conv"].name == "model/preprocess_conv"
    assert layers.targets["model.transformer.layers.1.ff.ff.0.proj"].name == "model/transformer/layers/1/ff/proj"
