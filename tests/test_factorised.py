"""Factorised codes (ViT-VQGAN, LlamaGen): a low-dimensional codebook behind learned
projections, l2-normalised for a cosine search; checked against float64 NumPy.

The trained round trip (Trainer -> Tokenizer -> export -> prior) runs as the ``vq-l2`` kind
of tests/test_quantizers.py.
"""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae.quantizers import (
    RVQConfig,
    VectorQuantizer,
    VQConfig,
    every_setting,
    kind_of,
    quantizer_from_dict,
)


def make(**options) -> VectorQuantizer:
    options = {"codebook_dim": 4, "normalize": True, **options}
    return VectorQuantizer(64, 16, rngs=nnx.Rngs(0), **options)


def linear64(layer, x):
    """An nnx.Linear in float64 NumPy."""
    kernel = np.asarray(layer.kernel.get_value(), np.float64)
    return x @ kernel + np.asarray(layer.bias.get_value(), np.float64)


def unit64(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("learning", ["ema", "gradient"])
def test_cosine_codes_are_unit_vectors_and_stay_so_in_training(learning):
    q = make(learning=learning, dead_code_threshold=1.5 if learning == "ema" else 0.0)
    z = jax.random.normal(jax.random.key(1), (8, 32, 16))
    for _ in range(3):
        out = q(z, train=True)
    assert q.codebook.get_value().shape == (64, 4) and q.codes().shape == (64, 16)
    np.testing.assert_allclose(np.linalg.norm(q.assignment_codes(), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(q.project(z), axis=-1), 1.0, rtol=1e-5)
    if learning == "ema":  # restarts seeded from projected vectors: unit vectors too
        assert int(out.metrics["codes_restarted"]) > 0
        np.testing.assert_allclose(np.linalg.norm(q.codebook.get_value(), axis=-1), 1.0, 1e-5)


@pytest.mark.parametrize("precision", ["highest", "rerank"])
def test_assignment_is_the_exact_cosine_nearest_against_a_float64_brute_force(precision):
    q = make(precision=precision)
    z = np.asarray(jax.random.normal(jax.random.key(2), (2048, 16)), np.float64)
    out = q(jnp.asarray(z, jnp.float32))

    u = unit64(linear64(q.project_in, z))  # (N, 4)
    codes = unit64(np.asarray(q.codebook.get_value(), np.float64))  # (K, 4)
    cosine = u @ codes.T
    expected = np.argmax(cosine, axis=1)
    top2 = np.sort(cosine, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5  # not a near-tie that float32 rounding could flip
    assert clear.sum() > 0.99 * len(z)
    ids = np.asarray(out.indices)
    np.testing.assert_array_equal(ids[clear], expected[clear])
    # a near-tie goes to one of the tied codes
    assert np.all(cosine.max(axis=1) - cosine[np.arange(len(z)), ids] <= 1e-5)

    decoded = linear64(q.project_out, codes[ids])  # what the decoder sees, (N, 16)
    np.testing.assert_allclose(out.quantized, decoded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q.lookup(out.indices), out.quantized, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(q.codes()[out.indices], out.quantized, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_straight_through_gradient_reaches_the_input_through_both_projections(normalize):
    """d(g . quantized)/dz is the gradient of the smooth path project_out(project_in(z))
    (with the l2 normalisation between, where set): the lookup is skipped, nothing else."""
    q = make(normalize=normalize, learning="gradient")
    graphdef, params, rest = nnx.split(q, nnx.Param, ...)
    z = jax.random.normal(jax.random.key(3), (64, 16))
    g = jax.random.normal(jax.random.key(4), (64, 16))

    def through_quantizer(params, z):
        return jnp.sum(g * nnx.merge(graphdef, params, rest)(z).quantized)

    def smooth(z):
        return jnp.sum(g * q.unproject(q.project(z)))

    dz = jax.grad(through_quantizer, argnums=1)(params, z)
    np.testing.assert_allclose(dz, jax.grad(smooth)(z), rtol=1e-5, atol=1e-6)
    if not normalize:  # the plain chain rule: g W_out^T W_in^T
        k_in, k_out = q.project_in.kernel.get_value(), q.project_out.kernel.get_value()
        np.testing.assert_allclose(dz, g @ k_out.T @ k_in.T, rtol=1e-5, atol=1e-6)
    dp = jax.grad(through_quantizer)(params, z)
    for name in ("project_in", "project_out"):
        assert float(jnp.abs(dp[name]["kernel"].get_value()).max()) > 0, name
    # the codebook learns from its own loss only, not from the decoder's gradient
    assert float(jnp.abs(dp["codebook"].get_value()).max()) == 0.0


def test_rotation_trick_forwards_the_same_codes_and_its_gradient_reaches_the_input():
    ste, rot = make(), make(estimator="rotation")
    z = jax.random.normal(jax.random.key(5), (64, 16))
    a, b = ste(z), rot(z)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.quantized, b.quantized, rtol=1e-5, atol=1e-6)
    dz = jax.grad(lambda z: jnp.sum(rot(z).quantized ** 2))(z)
    assert float(jnp.abs(dz).max()) > 0


def test_kmeans_init_clusters_the_projected_vectors():
    q = make(normalize=False)
    centres = 3.0 * jax.random.normal(jax.random.key(6), (64, 16))
    z = centres[jnp.arange(1024) % 64] + 0.01 * jax.random.normal(jax.random.key(7), (1024, 16))
    q.init_from_batch(z, jax.random.key(8))
    u = np.asarray(q.project(z), np.float64)
    codes = np.asarray(q.assignment_codes(), np.float64)
    d = np.min(np.sum((u[:, None] - codes[None]) ** 2, -1), axis=1)
    spread = np.mean(np.sum((u - u.mean(0)) ** 2, -1))
    assert q.codebook.get_value().shape == (64, 4)
    assert np.median(d) < 1e-3 * spread  # most projected clusters got a centre of their own


def test_bad_factorised_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="codebook_dim must be 0 .* code_dim - 1 = 15, got 16"):
        make(codebook_dim=16)
    with pytest.raises(ValueError, match="codebook_dim must be >= 0"):
        VQConfig(codebook_dim=-1)
    for kind in ("rvq", "fsq", "lfq"):  # factorised codes are vq's own setting
        assert "codebook_dim" not in kind_of(kind)().to_dict()


def test_another_kinds_setting_is_ignored_and_named_when_set(caplog):
    """A run config lists every kind's fields: the chosen kind keeps its own, and one of
    another kind's set away from its default is named in a warning."""
    section = every_setting(RVQConfig(residual_levels=2))
    with caplog.at_level(logging.WARNING, logger="vqvae.quantizers.config"):
        assert quantizer_from_dict(section) == RVQConfig(residual_levels=2)
        stored = json.loads(json.dumps(section))  # as a checkpoint's meta reads back
        assert quantizer_from_dict(stored) == RVQConfig(residual_levels=2)
        assert not caplog.records
        assert quantizer_from_dict({**section, "codebook_dim": 4}) == RVQConfig(residual_levels=2)
    (record,) = caplog.records
    assert (
        record.getMessage() == "quantizer kind 'rvq' ignores codebook_dim=4 (other kinds' settings)"
    )
    with pytest.raises(ValueError, match=r"unknown quantizer config keys: \['codebok_dim'\]"):
        quantizer_from_dict({**section, "codebok_dim": 4})


def test_the_config_builds_it_and_a_config_without_the_field_loads_unchanged():
    qc = VQConfig(num_codes=64, codebook_dim=4, normalize=True)
    q = qc.build(16, nnx.Rngs(0))
    assert q.factorised and q.codebook_dim == 4 and q.codes().shape == (64, 16)
    old = {k: v for k, v in VQConfig(num_codes=64).to_dict().items() if k != "codebook_dim"}
    plain = quantizer_from_dict(old).build(16, nnx.Rngs(0))
    assert not plain.factorised and plain.codebook.get_value().shape == (64, 16)


def test_report_names_the_stored_codes_width():
    from vqvae.model import PRESETS
    from vqvae.report import static_figures

    config = PRESETS["sonnet-cifar"].replace(
        quantizer=VQConfig(num_codes=16384, codebook_dim=8, normalize=True)
    )
    figures = static_figures(config)
    assert figures["quantizer"] == "vq 16384 x 8, cosine (projected from 64)"
    plain = static_figures(PRESETS["sonnet-cifar"])
    # the two projections: 64 x 8 + 8 and 8 x 64 + 64 weights more, a codebook 8 times smaller
    assert figures["parameters"] == plain["parameters"] + 2 * 64 * 8 + 8 + 64
    assert figures["inference_weights"] - plain["inference_weights"] == (
        2 * 64 * 8 + 8 + 64 + 16384 * 8 - 512 * 64
    )


def test_kmeans_init_in_training_seeds_a_gradient_learned_factorised_codebook(tmp_path):
    """kmeans_init writes the codebook where it lives: among the parameters when it is
    gradient-learned (it was dropped there, only the non-parameter state was kept)."""
    from vqvae.trainer import Trainer

    from .conftest import config

    c = config(kmeans_init=True, num_devices=1)
    c.model.quantizer.update(learning="gradient", codebook_dim=4, normalize=True)
    trainer = Trainer(c, tmp_path)
    plain = trainer.init_state()["params"]["quantizer"]
    state, _, _ = trainer.restore_or_init()
    codebook = np.asarray(state["params"]["quantizer"]["codebook"].get_value())
    assert not np.allclose(codebook, plain["codebook"].get_value())
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-5)
    # the projections are left as they were: k-means ran on their outputs
    np.testing.assert_array_equal(
        state["params"]["quantizer"]["project_in"]["kernel"].get_value(),
        plain["project_in"]["kernel"].get_value(),
    )
