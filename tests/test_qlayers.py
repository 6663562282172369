import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae.study.qlayers import QuantizedConv, QuantizedLinear, uniform_quantizer
from vqvae.study.surrogates import piecewise_linear


def test_uniform_quantizer_clips_to_the_signed_range():
    q = uniform_quantizer(3)
    u = jnp.array([-9.0, -4.4, -0.6, 0.2, 2.5, 3.4, 3.6, 100.0])
    np.testing.assert_array_equal(q(u), [-4, -4, -1, 0, 2, 3, 3, 3])
    with pytest.raises(ValueError, match="bits"):
        uniform_quantizer(0)


@pytest.mark.parametrize("derivative", [None, piecewise_linear(0.5)])
def test_dense_forward_uses_grid_weights_and_backward_the_estimator(derivative):
    layer = QuantizedLinear(5, 3, bits=4, scale=0.1, derivative=derivative, rngs=nnx.Rngs(0))
    w = layer.quantized_kernel()
    steps = np.asarray(w) / 0.1
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)
    assert steps.min() >= -8 and steps.max() <= 7
    x = jax.random.normal(jax.random.key(1), (4, 5))
    np.testing.assert_allclose(layer(x), x @ w, rtol=1e-6)

    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    kernel = layer.kernel.get_value()
    grad = jax.grad(loss)(params)["kernel"].get_value()
    upstream = jax.grad(lambda wq: jnp.sum((x @ wq) ** 2))(w)  # at the quantized weights
    d = derivative(kernel / 0.1) if derivative else 1.0
    np.testing.assert_allclose(grad, upstream * d, rtol=1e-5)


def test_conv_forward_matches_a_plain_conv_on_the_quantized_kernel():
    conv = QuantizedConv(2, 4, (3, 3), strides=2, bits=2, scale=0.3, rngs=nnx.Rngs(0))
    w = conv.quantized_kernel()
    assert set(np.round(np.asarray(w) / 0.3).ravel().tolist()) <= {-2.0, -1.0, 0.0, 1.0}
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, 2))
    plain = nnx.Conv(2, 4, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0))
    plain.kernel.set_value(w)
    np.testing.assert_allclose(conv(x), plain(x), rtol=1e-5, atol=1e-6)
    assert conv(x).shape == (1, 4, 4, 4)


def test_the_study_maps_only_the_quantized_kernels_under_sgd():
    """The SGD equivalence's learning-rate factor is for the quantized weights: the STE
    copy's biases (not quantized) train at the plain learning rate."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
    import estimator_study as study

    model = study.ConvNet(bits=4, derivative=None, rngs=nnx.Rngs(0))
    _, params = nnx.split(model)
    tx = study._sgd_on_kernels(0.1, 0.75)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for name in ("conv1", "conv2", "head"):
        np.testing.assert_allclose(updates[name]["kernel"].get_value(), -0.075, rtol=1e-6)
        np.testing.assert_allclose(updates[name]["bias"].get_value(), -0.1, rtol=1e-6)
    h = study.pair_run(piecewise_linear(0.5), optimizer="sgd", lr=0.003, steps=40, every=40)
    assert h["bias_distance"][-1] < 0.05  # the biases train alike (0.33 when mapped too)
