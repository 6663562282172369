"""The experiments behind notebooks/estimators.ipynb: custom gradient estimators against the
straight-through estimator (STE), after Schoenbauer et al. 2024, "Custom Gradient
Estimators are Straight-Through Estimators in Disguise" (arXiv 2405.05171).

Part 1, weight quantization: a small ConvNet with quantized weights (``vqvae.study.qlayers``) on
scikit-learn's handwritten digits (8x8, 1,797 images, shipped inside scikit-learn: nothing
to download). Two copies train side by side on the same batches, one with a custom
estimator and one with the STE, and ``pair_run`` records how far apart they drift.

Part 2, vector quantization: the package's own VQ-VAE on the bundled sample photos with
the rotation trick or the STE, under Adam and SGD (``vq_run``), and the two estimators'
gradients at the encoder output compared on the same model (``estimator_gradients``).

Every function returns plain NumPy histories; the notebook plots them.
"""

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vqvae import ste
from vqvae.study import surrogates
from vqvae.study.qlayers import QuantizedConv, QuantizedLinear

# --- part 1: a ConvNet with quantized weights ------------------------------------------------


def load_digits(test: int = 397, seed: int = 0):
    """scikit-learn's digits as (images (N, 8, 8, 1) in [0, 1], labels (N,)), split into
    train and test at random: ((x, y), (x_test, y_test))."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return (x[test:], y[test:]), (x[:test], y[:test])


class ConvNet(nnx.Module):
    """Two 3x3 convolutions (16 and 32 channels, the second with stride 2) and a dense
    layer to 10 classes, every kernel quantized to ``bits`` on a grid spanning +-3 initial
    standard deviations; ``derivative`` None is the STE."""

    def __init__(self, *, bits: int, derivative: Callable | None, rngs: nnx.Rngs):
        def step(fan_in):
            return 3.0 / np.sqrt(fan_in) / 2 ** (bits - 1)

        q = dict(bits=bits, derivative=derivative, rngs=rngs)
        self.conv1 = QuantizedConv(1, 16, (3, 3), scale=step(9), **q)
        self.conv2 = QuantizedConv(16, 32, (3, 3), strides=2, scale=step(144), **q)
        self.head = QuantizedLinear(4 * 4 * 32, 10, scale=step(512), **q)

    def layers(self):
        return (self.conv1, self.conv2, self.head)

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, 8, 8, 1) -> logits (B, 10)
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        return self.head(h.reshape(h.shape[0], -1))


def _kernels(model: ConvNet) -> list[tuple[jax.Array, float]]:
    return [(layer.kernel.get_value(), layer.scale) for layer in model.layers()]


def _grid_ints(kernels) -> np.ndarray:
    """Every quantized weight as its grid integer, one flat array (clipping aside, which
    treats both models alike)."""
    return np.concatenate([np.round(np.asarray(k) / s).ravel() for k, s in kernels])


def _flat(kernels, transform=None) -> np.ndarray:
    parts = []
    for k, s in kernels:
        k = s * transform(k / s) if transform is not None else k
        parts.append(np.asarray(k).ravel())
    return np.concatenate(parts)


def pair_run(
    derivative: Callable,
    *,
    optimizer: str = "sgd",
    lr: float = 0.05,
    mapped: bool = True,
    adam_b2: float = 0.999,
    bits: int = 4,
    steps: int = 2000,
    batch_size: int = 64,
    every: int = 50,
    seed: int = 0,
    data=None,
) -> dict[str, np.ndarray]:
    """Train a custom-estimator ConvNet and an STE ConvNet from the same initial weights on
    the same batches, and record every ``every`` steps how far apart they are.

    ``mapped`` (SGD only): start the STE copy from the custom estimator's weights put
    through the weight map and train it at the learning rate times the factor, both from
    ``surrogates.sgd_equivalence``. ``adam_b2``: Adam's second-moment decay (how many steps
    its gradient scale averages over). Returns histories: ``step``; ``agree`` (share of quantized
    weights equal in the two); ``distance`` (|w_custom - w_ste| over |w_ste - w_ste(0)|, with
    w_custom mapped into the STE's coordinates when ``mapped``: 0 when they train alike, about
    1 or more when their difference is as large as what training moved); ``bias_distance``
    (the same for the biases, which are not quantized); ``acc_custom`` and
    ``acc_ste`` (test accuracy); and the learning-rate ``factor`` used.
    """
    (x, y), (xt, yt) = data if data is not None else load_digits()
    custom = ConvNet(bits=bits, derivative=derivative, rngs=nnx.Rngs(seed))
    plain = ConvNet(bits=bits, derivative=None, rngs=nnx.Rngs(seed))
    weight_map, factor = surrogates.sgd_equivalence(derivative) if mapped else (None, 1.0)
    if mapped:
        for layer in plain.layers():
            w = layer.kernel.get_value()
            layer.kernel.set_value(layer.scale * weight_map(w / layer.scale))
    if optimizer == "sgd":  # the factor is for the quantized kernels; biases train at lr
        tx_custom, tx_plain = optax.sgd(lr), _sgd_on_kernels(lr, factor)
    elif optimizer == "adam":
        if mapped:
            raise ValueError("the weight map and learning-rate factor are SGD's; Adam needs none")
        tx_custom = tx_plain = optax.adam(lr, b2=adam_b2)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")

    graph_c, params_c = nnx.split(custom)
    graph_p, params_p = nnx.split(plain)
    opt_c, opt_p = tx_custom.init(params_c), tx_plain.init(params_p)

    def loss(params, graph, xb, yb):
        logits = nnx.merge(graph, params)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def train_step(params_c, params_p, opt_c, opt_p, xb, yb):
        g_c = jax.grad(loss)(params_c, graph_c, xb, yb)
        g_p = jax.grad(loss)(params_p, graph_p, xb, yb)
        u_c, opt_c = tx_custom.update(g_c, opt_c, params_c)
        u_p, opt_p = tx_plain.update(g_p, opt_p, params_p)
        return optax.apply_updates(params_c, u_c), optax.apply_updates(params_p, u_p), opt_c, opt_p

    @jax.jit
    def accuracy(params, graph):
        return jnp.mean(jnp.argmax(nnx.merge(graph, params)(xt), -1) == yt)

    start, bias_start = _flat(_kernels(plain)), _biases(plain)
    names = ("step", "agree", "distance", "bias_distance", "acc_custom", "acc_ste")
    history = {k: [] for k in names}
    rng = np.random.default_rng(seed)
    order = np.array([], np.int64)
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            model_c, model_p = nnx.merge(graph_c, params_c), nnx.merge(graph_p, params_p)
            kc, kp = _kernels(model_c), _kernels(model_p)
            wc, wp = _flat(kc, weight_map), _flat(kp)
            moved = max(np.linalg.norm(wp - start), 1e-12)
            bc, bp = _biases(model_c), _biases(model_p)
            bias_moved = max(np.linalg.norm(bp - bias_start), 1e-12)
            bias_gap = float(np.linalg.norm(bc - bp) / bias_moved) if t else 0.0
            history["bias_distance"].append(bias_gap)
            history["step"].append(t)
            history["agree"].append(float(np.mean(_grid_ints(kc) == _grid_ints(kp))))
            history["distance"].append(float(np.linalg.norm(wc - wp) / moved) if t else 0.0)
            history["acc_custom"].append(float(accuracy(params_c, graph_c)))
            history["acc_ste"].append(float(accuracy(params_p, graph_p)))
        if t == steps:
            break
        if len(order) < batch_size:  # epochs of reshuffled training images
            order = np.concatenate([order, rng.permutation(len(y))])
        idx, order = order[:batch_size], order[batch_size:]
        params_c, params_p, opt_c, opt_p = train_step(
            params_c, params_p, opt_c, opt_p, x[idx], y[idx]
        )
    out = {k: np.asarray(v) for k, v in history.items()}
    out["factor"] = np.float64(factor)
    return out


def _sgd_on_kernels(lr: float, factor: float) -> optax.GradientTransformation:
    """SGD at ``lr * factor`` on the quantized kernels and at ``lr`` on the rest (the
    biases, which are not quantized, so the map and factor do not apply to them)."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "kernel" if "['kernel']" in jax.tree_util.keystr(path) else "rest",
            params,
        )

    return optax.multi_transform({"kernel": optax.sgd(lr * factor), "rest": optax.sgd(lr)}, labels)


def _biases(model: ConvNet) -> np.ndarray:
    return np.concatenate([np.asarray(layer.bias.get_value()).ravel() for layer in model.layers()])


def lr_sweep(derivative: Callable, optimizer: str, lrs, **kwargs) -> dict[str, np.ndarray]:
    """``pair_run`` at each learning rate (with the map under SGD): the final agreement,
    distance and both test accuracies, to show where the equivalence breaks down."""
    rows = []
    for lr in lrs:
        h = pair_run(derivative, optimizer=optimizer, lr=lr, mapped=optimizer == "sgd", **kwargs)
        rows.append((lr, h["agree"][-1], h["distance"][-1], h["acc_custom"][-1], h["acc_ste"][-1]))
    cols = np.asarray(rows, np.float64).T
    return dict(zip(("lr", "agree", "distance", "acc_custom", "acc_ste"), cols, strict=True))


# --- part 2: the rotation trick against the STE in the package's VQ-VAE ----------------------


def photo_crops(count: int, size: int = 32, seed: int = 0, train: bool = True) -> np.ndarray:
    """``count`` crops (N, size, size, 3) uint8 of the sample photos (held-out part when
    ``train`` is False: its tiles, in order)."""
    from vqvae.sources import PhotoSource

    source = PhotoSource(size, 3, train)
    rng = np.random.default_rng(seed)
    if train:
        picks = rng.integers(0, len(source), count)
        return np.stack([source.decode(source[i], rng)["image"] for i in picks])
    return np.stack(
        [source.decode(source[i], None)["image"] for i in range(min(count, len(source)))]
    )


def vq_model(estimator: str, seed: int = 0):
    """configs/default.py's small VQ-VAE (32 px, 8x8 grid, 256 EMA codes), without its
    dead-code restarts, with the given estimator."""
    import sys
    from pathlib import Path

    from vqvae.model import VQVAEConfig
    from vqvae.quantizers import VQConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the configs folder
    from configs import default

    config = VQVAEConfig.from_dict(default.get_config().model.to_dict())
    config = config.replace(quantizer=VQConfig(num_codes=256, estimator=estimator))
    return config.build(nnx.Rngs(seed))


def estimator_gradients(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """On one batch and one model: the reconstruction loss's gradient at the encoder output
    under the STE and under the rotation trick, per code vector. Returns ``cosine`` between
    the two, ``norm_ratio`` (rotation over STE; the trick scales by |e|/|z|) and
    ``angle_ze`` (degrees between z and its code e)."""
    from vqvae.model import to_model_range

    x = to_model_range(jnp.asarray(images))
    z = model.encode(x)
    e = jax.lax.stop_gradient(model.quantizer(z).quantized)

    def grad_at_z(estimate):
        return jax.grad(lambda v: jnp.mean(jnp.square(model.decode(estimate(v, e)) - x)))(z)

    g_ste = grad_at_z(ste.ste_replace).reshape(-1, z.shape[-1])
    g_rot = grad_at_z(ste.rotation_trick).reshape(-1, z.shape[-1])
    zf, ef = z.reshape(-1, z.shape[-1]), e.reshape(-1, z.shape[-1])

    def cos(a, b):
        return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))

    return {
        "cosine": np.asarray(cos(g_rot, g_ste)),
        "norm_ratio": np.asarray(jnp.linalg.norm(g_rot, axis=-1) / jnp.linalg.norm(g_ste, axis=-1)),
        "angle_ze": np.degrees(np.arccos(np.clip(np.asarray(cos(zf, ef)), -1, 1))),
    }


def vq_run(
    estimator: str,
    optimizer: str,
    *,
    lr: float,
    steps: int = 600,
    batch_size: int = 32,
    every: int = 100,
    seed: int = 0,
    train_images: np.ndarray | None = None,
    test_images: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Train the small VQ-VAE with one estimator ("ste" or "rotation") and optimizer
    ("adam", or "sgd" with momentum 0.9); every ``every`` steps record the held-out
    normalised MSE, perplexity, the commitment distance |z - e|^2 / |e|^2 (mean), |z| / |e|
    (median) and the two estimators' gradient cosine and norm ratio (medians) on held-out
    images. Returns histories and
    the seconds taken."""
    from vqvae.model import to_model_range, vqvae_loss

    began = time.perf_counter()
    train_images = photo_crops(4096, seed=seed) if train_images is None else train_images
    test_images = photo_crops(256, train=False) if test_images is None else test_images
    x_test = to_model_range(jnp.asarray(test_images))
    variance = float(np.var(to_model_range(train_images[:1024])))
    model = vq_model(estimator, seed)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    if optimizer == "adam":
        tx = optax.adam(lr)
    elif optimizer == "sgd":
        tx = optax.sgd(lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    opt = tx.init(params)

    @jax.jit
    def train_step(params, rest, opt, images):
        def loss(params):
            m = nnx.merge(graph, params, rest, copy=True)
            value, _ = vqvae_loss(m, to_model_range(images), train=True, data_variance=variance)
            return value, nnx.state(m, nnx.Not(nnx.Param))

        grads, rest = jax.grad(loss, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), rest, opt

    @jax.jit
    def evaluate(params, rest):
        m = nnx.merge(graph, params, rest, copy=True)
        z = m.encode(x_test)
        q = m.quantizer(z)
        recon = m.decode(q.quantized)
        counts = jnp.bincount(q.indices.ravel(), length=m.quantizer.vocab_size)
        p = counts / counts.sum()
        perplexity = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))
        e_norm2 = jnp.sum(jnp.square(q.quantized), -1)
        commit = jnp.sum(jnp.square(z - q.quantized), -1) / e_norm2
        z_over_e = jnp.sqrt(jnp.sum(jnp.square(z), -1) / e_norm2)
        nmse = jnp.mean(jnp.square(recon - x_test)) / variance
        return nmse, perplexity, jnp.mean(commit), jnp.median(z_over_e)

    keys = ("step", "nmse", "perplexity", "commitment", "z_over_e", "cosine", "norm_ratio")
    history = {k: [] for k in keys}
    rng = np.random.default_rng(seed)
    for t in range(steps + 1):
        if t % every == 0 or t == steps:
            measured = evaluate(params, rest)
            g = estimator_gradients(nnx.merge(graph, params, rest, copy=True), test_images[:64])
            for k, v in zip(keys, (t, *measured), strict=False):
                history[k].append(float(v))
            history["cosine"].append(float(np.median(g["cosine"])))
            history["norm_ratio"].append(float(np.median(g["norm_ratio"])))
        if t == steps:
            break
        batch = train_images[rng.integers(0, len(train_images), batch_size)]
        params, rest, opt = train_step(params, rest, opt, batch)
    out = {k: np.asarray(v) for k, v in history.items()}
    out["seconds"] = np.float64(time.perf_counter() - began)
    return out
