"""The encoder/decoder nets, the presets' shapes, mixed precision and the VQ-VAE loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from vqvae.flops import count_flops
from vqvae.model import PRESETS, VQVAEConfig, vqvae_loss
from vqvae.nets.upconv import UpConv, canonical_form

TINY = VQVAEConfig.from_dict(tiny.get_config().model)  # the tests' tiny model


def _param_count(config: VQVAEConfig) -> int:
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _shapes(config: VQVAEConfig) -> dict[str, tuple]:
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, k)): tuple(v.shape) for k, v in flat}


def test_sonnet_cifar_preset_matches_the_reference_architecture():
    # conv 4x4/2 3->64, conv 4x4/2 64->128, conv 3x3 128->128, 2 res blocks (3x3 128->32,
    # 1x1 32->128), 1x1 128->64; 512 x 64 codebook; the decoder mirrors it.
    cfg = PRESETS["sonnet-cifar"]
    shapes = sorted(s for s in _shapes(cfg).values() if len(s) == 4)
    expected = sorted(
        [(4, 4, 3, 64), (4, 4, 64, 128), (3, 3, 128, 128), (1, 1, 128, 64)]  # encoder
        + [(3, 3, 128, 32), (1, 1, 32, 128)] * 4  # two res blocks each side
        + [(3, 3, 64, 128), (4, 4, 128, 64), (4, 4, 64, 3)]  # decoder (transposed: in, out)
    )
    assert shapes == expected
    assert _param_count(cfg) == 662_723
    assert cfg.grid_size == 8 and cfg.quantizer.num_codes == 512 and cfg.code_dim == 64


def test_f8_256_preset_matches_the_reference_architecture():
    cfg = PRESETS["f8-256"]
    shapes = list(_shapes(cfg).values())
    convs = [s for s in shapes if len(s) == 4]
    assert (3, 3, 3, 128) in convs and (3, 3, 128, 3) in convs  # stems
    for cin, cout in [(128, 128), (128, 256), (256, 512)]:
        assert (4, 4, cin, cout) in convs  # strided downsampling convs
    # residual blocks, hidden width half the channels: encoder 2 per stage at 128/256/512;
    # the decoder, mirrored, runs two at 512 before each upsampling to 512/256/128 channels
    for c, n in [(128, 2), (256, 4), (512, 6)]:
        assert convs.count((3, 3, c, c // 2)) == n and convs.count((1, 1, c // 2, c)) == n
    for cin, cout in [(512, 512), (512, 256), (256, 128)]:
        assert (4, 4, cin, cout) in convs  # transposed upsampling convs
    assert (1, 1, 512, 256) in convs and (3, 3, 256, 512) in convs  # in/out of the codes
    assert len(convs) == 34
    assert _param_count(cfg) == 20_365_059
    assert cfg.grid_size == 32 and cfg.quantizer.num_codes == 16384 and cfg.code_dim == 256
    assert cfg.compute_dtype == "bfloat16"


@pytest.mark.parametrize("mult,factor", [((1, 2), 4), ((1, 2, 2), 8), ((1, 1, 2, 2), 16)])
def test_downsampling_factor_and_shapes(mult, factor):
    cfg = TINY.replace(channel_mult=mult, image_size=32)
    model = cfg.build(nnx.Rngs(0))
    x = jnp.zeros((2, 32, 32, 3))
    out = model(x)
    assert cfg.downsample_factor == factor
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, 32 // factor, 32 // factor)
    assert out.indices.dtype == jnp.int32


def test_image_size_not_divisible_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size 18 is not divisible by the downsampling"):
        TINY.replace(image_size=18)


def test_config_round_trips_and_rejects_unknown_keys():
    assert VQVAEConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown model config keys: \\['widht'\\]"):
        VQVAEConfig.from_dict({**TINY.to_dict(), "widht": 3})


def test_bfloat16_convolutions_float32_params_and_quantizer():
    model = TINY.replace(compute_dtype="bfloat16").build(nnx.Rngs(0))
    dtypes = {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3)) - 0.5
    assert model.encoder(x).dtype == jnp.bfloat16
    assert model.encode(x).dtype == jnp.float32  # what the quantizer sees
    assert model.quantizer.codebook.get_value().dtype == jnp.float32
    assert model(x).reconstruction.dtype == jnp.float32


def test_encode_decode_helpers_agree_with_the_forward_pass():
    model = TINY.build(nnx.Rngs(1))
    x = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3)) - 0.5
    out = model(x)
    np.testing.assert_array_equal(model.encode_to_indices(x), out.indices)
    np.testing.assert_allclose(model.decode_indices(out.indices), out.reconstruction, atol=1e-6)


def test_loss_is_normalised_mse_plus_quantizer_loss():
    model = TINY.build(nnx.Rngs(2))
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3)) - 0.5
    loss, m = vqvae_loss(model, x, train=False, data_variance=0.25)
    out = model(x)
    mse = jnp.mean(jnp.square(out.reconstruction - x))
    np.testing.assert_allclose(m["mse"], mse, rtol=1e-6)
    np.testing.assert_allclose(loss, mse / 0.25 + out.quantizer_loss, rtol=1e-6)
    assert float(m["commitment_loss"]) > 0


@pytest.mark.slow  # a subprocess
def test_core_runs_without_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "import jax.numpy as jnp, flax.nnx as nnx\n"
        "import vqvae.trainer, vqvae.checkpoint, vqvae.data\n"
        "from vqvae.model import VQVAEConfig\n"
        "c = VQVAEConfig(image_size=8, base_channels=4, code_dim=4, quantizer=dict(num_codes=8))\n"
        "m = c.build(nnx.Rngs(0))\n"
        "print(m(jnp.zeros((1, 8, 8, 3))).indices.shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 2, 2)"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_upconv_equals_flax_conv_transpose_by_both_paths(dtype):
    """The decoder's up-sampling layer: the sub-pixel form (used on a CPU) and lax's own
    both give nnx.ConvTranspose's output and gradients, from the same variables."""
    ref = nnx.ConvTranspose(6, 5, (4, 4), strides=2, dtype=dtype, rngs=nnx.Rngs(0))
    ref.bias[...] = jax.random.normal(jax.random.key(1), (5,))
    x = jax.random.normal(jax.random.key(2), (2, 3, 4, 6))  # H != W
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for subpixel in (True, False):
        up = UpConv(6, 5, dtype=dtype, subpixel=subpixel, rngs=nnx.Rngs(9))
        assert jax.tree.map(jnp.shape, nnx.state(up)) == jax.tree.map(jnp.shape, nnx.state(ref))
        nnx.update(up, nnx.state(ref))
        y = up(x)
        assert y.shape == (2, 6, 8, 5) and y.dtype == dtype
        np.testing.assert_allclose(np.float32(y), np.float32(ref(x)), atol=tol, rtol=tol)

        def loss(m, x):
            return jnp.sum(jnp.sin(m(x).astype(jnp.float32)))

        got, want = nnx.grad(loss, argnums=(0, 1))(up, x), nnx.grad(loss, argnums=(0, 1))(ref, x)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.float32(g), np.float32(w), atol=10 * tol, rtol=tol)


def test_upconv_picks_sub_pixel_on_cpu_and_flops_count_the_canonical_form():
    """On this CPU an UpConv left to choose runs the sub-pixel form (no dilated input); a
    FLOP count traces the canonical transposed convolution, the same on every device."""
    up = UpConv(8, 4, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, 5, 5, 8), jnp.float32)
    dilations = [
        e.params["lhs_dilation"]
        for e in jax.make_jaxpr(lambda x: up(x))(x).jaxpr.eqns  # fresh functions: jax caches
        if e.primitive.name == "conv_general_dilated"
    ]
    assert dilations == [(1, 1)]  # one stride-1 convolution
    with canonical_form():
        eqns = jax.make_jaxpr(lambda x: up(x))(x).jaxpr.eqns
        (eqn,) = [e for e in eqns if "conv" in e.primitive.name]
    assert eqn.params["lhs_dilation"] == (2, 2)
    # each of the 10 x 10 x 4 outputs meets 2 x 2 taps of 8 channels
    assert count_flops(lambda x: up(x), x) == 2 * 10 * 10 * 4 * 2 * 2 * 8
