"""The SAO DiT: parameter counts against the checkpoint shapes, init closed forms, masking, rotary, precision, FLOPs."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from musicdiff.config import load_config
from musicdiff.describe import abstract_params, count
from musicdiff.models import attention as attention_module
from musicdiff.models import registry
from musicdiff.models.attention import CrossAttention, apply_rotary, attention, heads_major_attention, rotary_angles
from musicdiff.models.denoiser import ConditioningInputs, train_flops
from musicdiff.models.dit import dit_forward_flops, dit_train_flops, drop_cross_conditioning

# These tests call bare modules; model code needs a declared layout (musicdiff/parallel/sharding.py).
pytestmark = pytest.mark.usefixtures("unsharded")

SPEC_SHAPES = "/work/shared/spec/sao_1_0_state_dict_shapes.json"


def spec_dit_shapes() -> dict[str, tuple[int, ...]]:
    """The DiT's parameters in the SAO checkpoint: `model.model.*` without buffers (norm beta, rotary inv_freq)."""
    with open(SPEC_SHAPES) as f:
        shapes = json.load(f)
    return {key: tuple(shape) for key, shape in shapes.items() if key.startswith("model.model.")
            and not key.endswith("inv_freq") and not (key.endswith(".beta") and "norm" in key)}


def model_config(preset="tiny", **overrides):
    config = load_config(f"configs/diffusion.py:{preset}")
    with config.unlocked():
        config.model.update(overrides)
    return config.model


# Whole forward passes are jitted: op-by-op dispatch of a DiT costs far more CPU time than one compile.
forward = nnx.jit(lambda model, *args: model(*args))


@nnx.jit
def dit_forward(model, x, t, cross, mask, glob):
    """The denoiser protocol's call: model(x, t, cond)."""
    return model(x, t, ConditioningInputs(cross, mask, glob))


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def randomize(model, seed=1, scale=0.1):
    """Perturbs every parameter, so the zero-initialised branches carry signal."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    noisy = [jnp.asarray(np.asarray(leaf) + scale * rng.normal(size=leaf.shape), leaf.dtype) for leaf in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def inputs(batch=2, channels=64, length=16, tokens=8, cond_dim=32, global_dim=64):
    x = normal(10, (batch, channels, length))
    t = jnp.asarray(np.random.default_rng(11).uniform(size=batch), jnp.float32)
    cross = normal(12, (batch, tokens, cond_dim))
    mask = jnp.asarray(np.arange(tokens)[None, :] < np.array([[5], [tokens]])[:batch])
    glob = normal(13, (batch, global_dim))
    return x, t, cross, mask, glob


def test_sao_param_count_equals_checkpoint_shapes():
    golden = sum(math.prod(shape) for shape in spec_dit_shapes().values())
    assert golden == 1_056_828_544  # spec §2.7
    assert count(abstract_params(model_config("sao"))) == golden
    assert count(abstract_params(model_config("sao_small"))) == 340_863_104  # spec §2.7 / §8.2


def test_param_tree_maps_onto_checkpoint_keys():
    """Every DiT parameter has exactly one checkpoint key of the same size (the converter's renaming, spec §9.2)."""

    def checkpoint_key(path):
        key = ".".join(str(p) for p in path)
        key = key.replace("in_proj", "0").replace("out_proj", "2")
        key = key.replace(".ff.proj.", ".ff.ff.0.proj.").replace(".ff.out.", ".ff.ff.2.")
        return "model.model." + re.sub(r"\.scale$", ".gamma", re.sub(r"\.kernel$", ".weight", key))

    ours = {checkpoint_key(path): math.prod(var.get_value().shape)
            for path, var in nnx.to_flat_state(abstract_params(model_config("sao")))}
    assert ours == {key: math.prod(shape) for key, shape in spec_dit_shapes().items()}


@pytest.mark.parametrize("block_type", ["sao", "adaln_zero"])
def test_output_shape_and_optional_conditions(block_type):
    model = randomize(registry.build(model_config(block_type=block_type), nnx.Rngs(0)))
    x, t, cross, mask, glob = inputs()
    assert dit_forward(model, x, t, cross, mask, glob).shape == x.shape
    out = dit_forward(model, x, t, None, None, None)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


def test_sao_init_is_project_out_of_project_in():
    """Zero-initialised convs and branch outputs (spec §2.6): at init out = project_out(project_in(x)) per frame."""
    model = registry.build(model_config(), nnx.Rngs(0))
    x, t, cross, mask, glob = inputs()
    w_in = model.transformer.project_in.kernel[...]
    w_out = model.transformer.project_out.kernel[...]
    expected = jnp.einsum("bcl,ce,ed->bdl", x, w_in, w_out)
    np.testing.assert_allclose(dit_forward(model, x, t, cross, mask, glob), expected, rtol=1e-5, atol=1e-5)


def test_adaln_zero_blocks_start_as_identity():
    model = registry.build(model_config(block_type="adaln_zero"), nnx.Rngs(0))
    block = model.transformer.layers[0]
    # The branches themselves are live: only the zero gates silence them.
    assert float(jnp.abs(block.ff.out.kernel[...]).max()) > 0
    assert float(jnp.abs(block.self_attn.to_out.kernel[...]).max()) > 0
    h, cond, context = normal(3, (2, 16, 64)), normal(4, (2, 64)), normal(5, (2, 8, 32))
    cos, sin = rotary_angles(16, 8)
    args = (h, cond, context, jnp.ones((2, 8), bool), cos, sin)
    np.testing.assert_array_equal(forward(block, *args), h)
    assert block.modulation.kernel[...].shape == (64, 6, 64)
    assert not np.allclose(forward(randomize(block), *args), h)  # non-zero gates: the branches come through


def test_padded_cross_tokens_do_not_change_the_output():
    x, t, cross, mask, glob = inputs()
    changed = jnp.where(mask[:, :, None], cross, 100.0 * jnp.ones_like(cross))
    masked = randomize(registry.build(model_config(), nnx.Rngs(0)))
    np.testing.assert_allclose(dit_forward(masked, x, t, cross, mask, glob), dit_forward(masked, x, t, changed, mask, glob),
                               atol=1e-5)
    unmasked = randomize(registry.build(model_config(use_cross_attn_mask=False), nnx.Rngs(0)))
    assert not np.allclose(dit_forward(unmasked, x, t, cross, mask, glob), dit_forward(unmasked, x, t, changed, mask, glob),
                           atol=1e-3)
    # A fully masked context is the null condition: the same as no cross-attention at all.
    none = jnp.zeros_like(mask)
    np.testing.assert_allclose(dit_forward(masked, x, t, cross, none, glob), dit_forward(masked, x, t, None, None, glob),
                               atol=1e-5)


@pytest.mark.parametrize("num_heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "full"])
@pytest.mark.parametrize("per_head", [False, True], ids=["batched", "per_head"])
def test_heads_major_attention_equals_jax_dot_product_attention(num_heads, kv_heads, mask_kind, per_head,
                                                               monkeypatch):
    # 0 bytes: every (batch, head) goes through the head-by-head loop that long sequences take.
    monkeypatch.setattr(attention_module, "PER_HEAD_SCORES_BYTES", 0 if per_head else 1 << 40)
    batch, queries, keys, head_dim = 3, 7, 5, 16
    q, k, v = normal(20, (batch, queries, num_heads, head_dim)), normal(21, (batch, keys, kv_heads, head_dim)), \
        normal(22, (batch, keys, kv_heads, head_dim))
    rng = np.random.default_rng(23)
    mask = {"none": None,
            # Key padding as cross-attention passes it; the last sample has no valid key (the CFG null condition).
            "keys": jnp.asarray(np.arange(keys)[None, None, None, :] < np.array([3, 5, 0])[:, None, None, None]),
            "full": jnp.asarray(rng.uniform(size=(batch, num_heads, queries, keys)) < 0.6)}[mask_kind]
    got = jax.jit(lambda *args: heads_major_attention(*args))(q, k, v, mask)  # a fresh trace per threshold
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The closed form for the grouping: query head i reads kv head i // (num_heads // kv_heads).
    kv_of = np.arange(num_heads) // (num_heads // kv_heads)
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q), np.asarray(k)[:, :, kv_of]) / math.sqrt(head_dim)
    if mask is not None:
        logits = np.where(np.broadcast_to(np.asarray(mask), logits.shape), logits, -np.inf)
        logits = np.where(np.isinf(logits).all(-1, keepdims=True), 0.0, logits)  # all masked: uniform, as jax
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", probs, np.asarray(v)[:, :, kv_of]),
                               rtol=1e-5, atol=1e-5)
    assert jax.default_backend() != "cpu" or np.array_equal(attention(q, k, v, mask), got)  # the CPU default


def test_cross_attention_default_matches_xla_and_zeroes_the_null_condition():
    dim, context_dim, num_heads = 32, 16, 4  # 2 kv heads for 4 query heads (grouped)
    layer = randomize(CrossAttention(dim, context_dim, num_heads, rngs=nnx.Rngs(0), zero_init_out=False))
    x, context = normal(30, (3, 6, dim)), normal(31, (3, 5, context_dim))
    mask = jnp.asarray(np.arange(5)[None, :] < np.array([[2], [5], [0]]))
    got = forward(layer, x, context, mask)
    q = layer.q_norm(layer.to_q(x)) if layer.q_norm is not None else layer.to_q(x)
    kv = layer.to_kv(context)
    k = layer.k_norm(kv[:, :, 0]) if layer.k_norm is not None else kv[:, :, 0]
    reference = jax.nn.dot_product_attention(q, k, kv[:, :, 1], mask=mask[:, None, None, :], implementation="xla")
    reference = layer.to_out(reference.at[2].set(0.0))
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], np.zeros_like(got[2]))  # no valid token: no contribution (no bias)


def test_cfg_dropout_zeroes_tokens_and_mask():
    _, _, cross, mask, _ = inputs()
    tokens, dropped = drop_cross_conditioning(jax.random.key(0), cross, mask, 1.0)
    assert not bool(jnp.any(tokens)) and not bool(jnp.any(dropped))
    tokens, kept = drop_cross_conditioning(jax.random.key(0), cross, mask, 0.0)
    np.testing.assert_array_equal(tokens, cross)
    np.testing.assert_array_equal(kept, mask)


def test_rotary_is_the_closed_form_rotation():
    head_dim, dim, length, base = 64, 32, 7, 10000.0
    x = np.random.default_rng(0).normal(size=(1, length, 1, head_dim))
    cos, sin = rotary_angles(length, dim, base)
    got = np.asarray(apply_rotary(jnp.asarray(x, jnp.float32), cos, sin))
    expected = x.copy()
    half = dim // 2
    for n in range(length):
        for j in range(half):
            theta = n * base ** (-2.0 * j / dim)
            a, b = x[0, n, 0, j], x[0, n, 0, j + half]
            expected[0, n, 0, j] = a * math.cos(theta) - b * math.sin(theta)
            expected[0, n, 0, j + half] = b * math.cos(theta) + a * math.sin(theta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., dim:], x[..., dim:].astype(np.float32))  # partial: the rest passes


def test_rotary_scores_depend_only_on_relative_position():
    length, head_dim = 40, 64
    cos, sin = rotary_angles(length, 32)
    q, k = normal(1, (head_dim,)), normal(2, (head_dim,))

    def score(m, n):
        qs = apply_rotary(jnp.broadcast_to(q, (1, length, 1, head_dim)), cos, sin)[0, m, 0]
        ks = apply_rotary(jnp.broadcast_to(k, (1, length, 1, head_dim)), cos, sin)[0, n, 0]
        return float(qs @ ks)

    for m, n, shift in [(3, 1, 10), (0, 5, 30), (12, 12, 7)]:
        assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_bf16_compute_is_close_to_fp32():
    x, t, cross, mask, glob = inputs()
    outs = {}
    for dtype in ("float32", "bfloat16"):
        model = randomize(registry.build(model_config(dtype=dtype), nnx.Rngs(0)))
        assert model.transformer.project_in.kernel[...].dtype == jnp.float32  # params stay fp32
        outs[dtype] = np.asarray(dit_forward(model, x, t, cross, mask, glob), np.float32)
    error = np.linalg.norm(outs["bfloat16"] - outs["float32"]) / np.linalg.norm(outs["float32"])
    assert error < 3e-2


def test_remat_policies_keep_the_gradients():
    x, t, cross, mask, glob = inputs()
    grads = {}
    for remat in ("none", "full", "dots"):
        model = randomize(registry.build(model_config(remat=remat, depth=1), nnx.Rngs(0)))
        grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, t, ConditioningInputs(cross, mask, glob)) ** 2)))
        grads[remat] = jax.tree.leaves(nnx.state(grad(model), nnx.Param))
    for remat in ("full", "dots"):
        for a, b in zip(grads["none"], grads[remat]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_flops_hand_computed_tiny_case():
    # E=64, C=64, heads 4, context 32 wide (no projection), T=8 cross tokens, L=16 frames -> N=17 with the token.
    E, C, Dc, G, F, L, N, T = 64, 64, 32, 32, 256, 16, 17, 8
    outside = (2 * (256 * E + E * E) + 2 * (G * E + E * E) + 2 * T * (32 * Dc + Dc * Dc)
               + 4 * L * C * C + 2 * L * C * E + 2 * N * E * C)
    block = (8 * N * E * E + 4 * N * N * E) + (4 * N * E * E + 4 * T * Dc * Dc + 4 * N * T * E) + 6 * N * E * F
    config = model_config(global_cond_dim=G)
    assert dit_forward_flops(config, 3, L, T) == 3 * (outside + 2 * block)
    assert dit_train_flops(config, 3, L, T) == 9 * (outside + 2 * block)


def test_sao_train_flops_match_the_analytic_estimate():
    # jax_anchors §6.2: ~6.84 TFLOP per 1024-frame clip with 130 cross tokens (its k/v term is 0.3% larger).
    assert dit_train_flops(model_config("sao"), 1, 1024, 130) == pytest.approx(6.84e12, rel=0.01)
    # The denoiser protocol: the model reports its own count (what training's MFU uses).
    model = nnx.eval_shape(lambda: registry.build(model_config("sao"), nnx.Rngs(0)))
    assert train_flops(model, 1, 1024, 130) == dit_train_flops(model_config("sao"), 1, 1024, 130)


def test_block_residuals_are_added_after_their_block():
    """ControlNet's extension point: residual i joins the hidden state right after block i."""
    model = randomize(registry.build(model_config(), nnx.Rngs(0)))
    x, t, cross, mask, glob = inputs()
    cond = ConditioningInputs(cross, mask, glob)
    frames = x.shape[2] + 1  # the prepended conditioning token
    residual = normal(20, (x.shape[0], frames, 64))
    plain = forward(model, x, t, cond)
    with_zero = nnx.jit(lambda m: m(x, t, cond, block_residuals=[jnp.zeros_like(residual)]))(model)
    np.testing.assert_array_equal(with_zero, plain)
    captured = {}
    first = model.transformer.layers[0]
    original = type(first).__call__

    def record(block, h, *args, **kwargs):  # the hidden state entering block 1 is block 0's output + residual
        out = original(block, h, *args, **kwargs)
        captured.setdefault(id(block), out)
        return out

    type(first).__call__ = record
    try:
        with_residual = model(x, t, cond, block_residuals=[residual])
        entering = {}

        def record_input(block, h, *args, **kwargs):
            entering.setdefault(id(block), h)
            return original(block, h, *args, **kwargs)

        type(first).__call__ = record_input
        model(x, t, cond, block_residuals=[residual])
    finally:
        type(first).__call__ = original
    second = model.transformer.layers[1]
    np.testing.assert_allclose(entering[id(second)], captured[id(first)] + residual, rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_residual, plain)


def test_adapters_live_in_their_own_subtree_and_start_as_the_identity():
    base = registry.build(model_config(), nnx.Rngs(0))
    adapted = registry.build(model_config(adapter=dict(name="cross_attention", width=16)), nnx.Rngs(0))
    names = lambda m: {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    extra = names(adapted) - names(base)
    assert names(base) <= names(adapted) and extra
    assert all(name.startswith("transformer/adapters/") for name in extra)  # the converter's keys are untouched
    x, t, cross, mask, glob = inputs()
    cond = ConditioningInputs(cross, mask, glob)
    nnx.update(adapted, nnx.state(base, nnx.Param))  # same base weights; the adapters keep their zero output init
    tokens = normal(21, (x.shape[0], 5, 16))
    out = nnx.jit(lambda m: m(x, t, cond, adapter_inputs={"tokens": tokens}))(adapted)
    np.testing.assert_array_equal(out, forward(base, x, t, cond))
    randomize(adapted)
    assert not np.allclose(nnx.jit(lambda m: m(x, t, cond, adapter_inputs={"tokens": tokens}))(adapted),
                           nnx.jit(lambda m: m(x, t, cond, adapter_inputs={"tokens": tokens * 0}))(adapted))


@pytest.mark.parametrize("overrides", [dict(), dict(block_type="adaln_zero"), dict(qk_norm="ln"),
                                       dict(use_cross_attn_mask=False)])
def test_rows_past_the_context_equal_the_all_zero_null_context(overrides):
    """The CFG batch [cond; null] with the null half implicit equals the explicit zero tokens (mask kept), the
    null condition the reference and null_condition use."""
    model = randomize(registry.build(model_config(**overrides), nnx.Rngs(0)))
    x, t, cross, mask, glob = inputs()
    x2, t2, glob2 = (jnp.concatenate([a, a], axis=0) for a in (x, t, glob))
    explicit = dit_forward(model, x2, t2, jnp.concatenate([cross, jnp.zeros_like(cross)]),
                       jnp.concatenate([mask, mask]), glob2)
    implicit = dit_forward(model, x2, t2, cross, mask, glob2)
    np.testing.assert_allclose(implicit, explicit, rtol=1e-5, atol=1e-5)
    # The null rows differ from the conditional ones: the context reaches the output.
    assert not np.allclose(implicit[:2], implicit[2:], atol=1e-3)
    with pytest.raises(ValueError, match="cross_mask"):
        dit_forward(model, x2, t2, cross, mask[:1], glob2)


@pytest.mark.parametrize("block_type", ["sao", "adaln_zero"])
def test_patches_are_consecutive_frames_read_as_one_wider_token(block_type):
    """patch_size=p over C channels is the p=1 DiT over p·C channels fed x regrouped by hand: token j holds frames
    j·p .. j·p+p-1, frame-major (frame k's C channels at k·C .. k·C+C-1), and the output is regrouped back."""
    p, C, L = 4, 16, 32
    patched = randomize(registry.build(model_config(block_type=block_type, io_channels=C, patch_size=p),
                                       nnx.Rngs(0)))
    wide = registry.build(model_config(block_type=block_type, io_channels=p * C), nnx.Rngs(1))
    nnx.update(wide, nnx.state(patched, nnx.Param))
    x, t, cross, mask, glob = inputs(channels=C, length=L)
    grouped = np.asarray(x).transpose(0, 2, 1).reshape(2, L // p, p * C).transpose(0, 2, 1)  # [B, p·C, L/p]
    expected = dit_forward(wide, jnp.asarray(grouped), t, cross, mask, glob)
    expected = np.asarray(expected).transpose(0, 2, 1).reshape(2, L, C).transpose(0, 2, 1)
    np.testing.assert_allclose(np.asarray(dit_forward(patched, x, t, cross, mask, glob)), expected, atol=1e-5)
    assert dit_forward_flops(model_config(io_channels=C, patch_size=p), 1, L, 8) == dit_forward_flops(
        model_config(io_channels=p * C), 1, L // p, 8)
    with pytest.raises(ValueError, match="multiple of config.model.patch_size"):
        forward(patched, x[:, :, :30], t)


def test_sinusoidal_embedding_is_the_reference_table_added_after_the_prepended_token():
    """scale · [sin(n f_j), cos(n f_j)], f_j = 10000^(-j/(D/2)), scale = D^-0.5 at init; position 0 is the prepended
    conditioning token. A zero scale gives back the model without it, so the table is all that the option adds."""
    from musicdiff.models.transformer import ScaledSinusoidalEmbedding

    dim, length = 8, 5
    table = np.asarray(ScaledSinusoidalEmbedding(dim)(length))
    for n in range(length):
        for j in range(dim // 2):
            angle = n * 10000.0 ** (-j / (dim // 2))
            assert table[n, j] == pytest.approx(math.sin(angle) / math.sqrt(dim), abs=1e-6)
            assert table[n, dim // 2 + j] == pytest.approx(math.cos(angle) / math.sqrt(dim), abs=1e-6)

    with_positions = randomize(registry.build(model_config(sinusoidal_embedding=True), nnx.Rngs(0)))
    plain = registry.build(model_config(), nnx.Rngs(1))
    weights = nnx.to_pure_dict(nnx.state(with_positions, nnx.Param))
    del weights["transformer"]["pos_emb"]  # the one parameter the option adds
    plain_state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(plain_state, weights)
    nnx.update(plain, plain_state)
    x, t, cross, mask, glob = inputs()
    assert not np.allclose(dit_forward(with_positions, x, t, cross, mask, glob), dit_forward(plain, x, t, cross, mask,
                                                                                          glob), atol=1e-4)
    with_positions.transformer.pos_emb.scale[...] = jnp.zeros((1,))
    np.testing.assert_allclose(dit_forward(with_positions, x, t, cross, mask, glob),
                               dit_forward(plain, x, t, cross, mask, glob), atol=1e-6)
