"""What a kind of training supplies to the loop: model, loss, data, evaluation, meta.

The loop (``vqvae.trainer``) owns the rest: the mesh and shardings, the jitted step with
donation, checkpoints and resume, signals, the NaN stop, logging. State is a dict of
pytrees: ``params`` and ``rest`` (the model's parameters and other state: what inference
needs, the checkpoint's ``model`` item), ``opt`` and ``step``, and whatever else a task
keeps (the checkpoint's ``train`` item).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vqvae.errors import InvalidValueError
from vqvae.sources import make_source

MODEL_KEYS = ("params", "rest")  # the inference model; everything else is training state
# the console's evaluation line: (metric, label, format), in this order, where present
SUMMARY = (
    ("psnr", "PSNR (dB)", ".2f"),
    ("normalized_mse", "normalised MSE", ".4f"),
    ("codes_used", "codes used", ".0f"),
    ("perplexity", "perplexity", ".1f"),
    ("dead_codes", "dead codes", ".0f"),
    ("sharpness", "sharpness", ".3f"),
)


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int):
    """The learning rate after n updates: linear warm-up, then cosine decay to
    ``final_lr_fraction`` of ``lr`` (the trainer logs it too)."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0 if warmup else optim.lr,
        optim.lr,
        warmup,
        max(total_steps, warmup + 1),
        end_value=optim.lr * optim.final_lr_fraction,
    )


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """Adam, AdamW or plain SGD with linear warm-up and cosine decay, optional gradient
    clipping."""
    schedule = make_schedule(optim, total_steps)
    if optim.name == "adam":
        opt = optax.adam(schedule, b1=optim.b1, b2=optim.b2)
    elif optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
    elif optim.name == "sgd":
        opt = optax.sgd(schedule)
    else:
        raise InvalidValueError(f"optim.name must be 'adam', 'adamw' or 'sgd', got {optim.name!r}")
    if optim.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt


def make_train_step(graphdef, tx, loss_fn):
    """The pure step: (state, batch, consts) -> (state, metrics). state: params, rest, opt,
    step; ``consts``: the task's constants (unused here).

    ``loss_fn(model, batch) -> (loss, metrics)`` may update the model's non-parameter state
    (the EMA codebook); that state is carried out of the step.
    """

    def train_step(state, batch, consts=None):
        def loss(params):
            # copy: fresh Variables in this trace, so the EMA update may write to them
            model = nnx.merge(graphdef, params, state["rest"], copy=True)
            value, metrics = loss_fn(model, batch)
            return value, (nnx.state(model, nnx.Not(nnx.Param)), metrics)

        grads, (rest, metrics) = jax.grad(loss, has_aux=True)(state["params"])
        params, opt = apply_update(tx, grads, state["params"], state["opt"])
        metrics["grad_norm"] = optax.tree.norm(grads)
        new = {**state, "params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}
        return new, metrics

    return train_step


def apply_update(tx: optax.GradientTransformation, grads, params, opt_state):
    """One optimizer update: -> (new params, new optimizer state)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class Task:
    """One kind of training. Subclasses set ``kind`` and fill in the methods that raise.

    ``stats`` holds the figures the loss needs that come from the data (the pixel
    variance): computed once on a fresh start (``compute_stats``), kept in the checkpoint's
    meta and restored from it, so a resumed run uses the same.
    """

    kind = ""
    # the held-out figure (lower is better) whose best checkpoint the loop keeps in
    # WORKDIR/best with ``keep_best`` (and stops on with ``early_stop_rise``); None: none
    best_metric: str | None = None

    def __init__(self, config: ml_collections.ConfigDict, arrays=None):
        self.config, self.arrays = config, arrays
        self.model_config = self.make_model_config()
        self.tx = make_optimizer(config.optim, config.steps)
        self.stats: dict[str, float] = {}

    # --- the model and its state --------------------------------------------------------
    def make_model_config(self):
        """The model's config dataclass (``build(rngs)``, ``to_dict()``)."""
        raise NotImplementedError

    def init_state(self) -> dict[str, Any]:
        """Fresh state (runs inside ``jax.jit``, which lays it out sharded)."""
        model = self.model_config.build(nnx.Rngs(self.config.seed))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        step = jnp.zeros((), jnp.int32)
        return {"params": params, "rest": rest, "opt": self.tx.init(params), "step": step}

    def graphdef(self):
        """The model's static structure (no arrays are made)."""
        return nnx.graphdef(nnx.eval_shape(lambda: self.model_config.build(nnx.Rngs(0))))

    def train_step(self, graphdef):
        """The pure step (state, batch, consts) -> (state, metrics) that the loop jits once."""
        return make_train_step(graphdef, self.tx, self.loss)

    def constants(self) -> dict[str, Any]:
        """Arrays the step reads but never trains or saves (pretrained weights, say): passed
        to it as an argument, replicated, rather than baked into the compiled program."""
        return {}

    def loss(self, model, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def first_state(self, state: dict, first_batch: dict, graphdef, shardings) -> dict:
        """A fresh state's last touch from the first training batch (k-means, say)."""
        return state

    # --- data -----------------------------------------------------------------------------
    def source(self, train: bool):
        d, m = self.config.data, self.model_config
        return make_source(
            d,
            image_size=m.image_size,
            channels=m.channels,
            train=train,
            seed=self.config.seed,
            arrays=self.arrays,
        )

    def host_fn(self):
        """A change to each host batch before it becomes global (None: none)."""
        return None

    def compute_stats(self, train_source) -> dict[str, float]:
        return {}

    def restore_stats(self, meta: dict) -> dict[str, float]:
        """The stats a checkpoint's meta holds (as ``compute_stats`` made them)."""
        return dict(meta.get("stats") or {})

    # --- evaluation -----------------------------------------------------------------------
    def eval_step(self, graphdef):
        """fn(state, batch) -> dict of sums over the batch's weighted examples (jitted by
        the loop; the sums of all batches are added on the devices)."""
        raise NotImplementedError

    def eval_finish(self, sums: dict, state: dict) -> dict[str, jax.Array]:
        """The held-out metrics (scalars) from the summed ``sums``; runs jitted."""
        raise NotImplementedError

    def preview(self, graphdef):
        """fn(state, batch) -> uint8 images for the evaluation grid, or None for no grid."""
        return None

    def host_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Figures derived on the host from the scalar metrics (PSNR of the MSE, say)."""
        return metrics

    def eval_summary(self, metrics: dict[str, float]) -> str:
        """The evaluation's console line: the figures that matter, and over how many."""
        shown = [f"{label} {metrics[k]:{fmt}}" for k, label, fmt in SUMMARY if k in metrics]
        rest = ", ".join(shown) or ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        return f"{rest}, over {int(metrics.get('examples', 0)):,} held-out examples"

    # --- checkpoints ----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """What a checkpoint says about the run, beside the arrays."""
        return {
            "kind": self.kind,
            "model_class": f"{type(self.model_config).__module__}:"
            f"{type(self.model_config).__qualname__}",
            "model": self.model_config.to_dict(),
            "config": self.config.to_dict(),
            "stats": self.stats,
            "data": {
                "source": self.config.data.source,
                "seed": self.config.seed,
                "val_fraction": self.config.data.val_fraction,
            },
        }
