"""Train state, the jitted train step, the training loop, evaluation and logging.

The model is split once (``nnx.split``) into a static graph, parameters and EMA state; the
step is a pure function of plain pytrees that merges them back inside, jitted once with
explicit in/out shardings and the old state donated. State is created already sharded
(``jax.jit(init, out_shardings=...)``), in one compiled program rather than one per array.
"""

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vqvae import data as data_lib
from vqvae.checkpoint import Checkpoints, DamagedCheckpoint
from vqvae.lock import WorkdirLock
from vqvae.logs import MetricsLog, Progress, image_grid, psnr
from vqvae.model import VQVAEConfig, to_model_range, to_uint8, vqvae_loss
from vqvae.quantizer import codebook_health
from vqvae.runtime import StopRequest
from vqvae.sharding import batch_sharding, check_batch_size, make_mesh, replicated, state_shardings

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """Adam or AdamW with linear warm-up and cosine decay, optional gradient clipping."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup else optim.lr,
        optim.lr,
        warmup,
        max(total_steps, warmup + 1),
        end_value=optim.lr * optim.final_lr_fraction,
    )
    if optim.name == "adam":
        opt = optax.adam(schedule, b1=optim.b1, b2=optim.b2)
    elif optim.name == "adamw":
        opt = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay)
    else:
        raise ValueError(f"optim.name must be 'adam' or 'adamw', got {optim.name!r}")
    if optim.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt)
    return opt


def make_train_step(graphdef, tx, loss_fn):
    """The pure step: (state, batch) -> (state, metrics). state: params, rest, opt, step.

    ``loss_fn(model, batch) -> (loss, metrics)`` may update the model's non-parameter state
    (the EMA codebook); that state is carried out of the step.
    """

    def train_step(state, batch):
        def loss(params):
            # copy: fresh Variables in this trace, so the EMA update may write to them
            model = nnx.merge(graphdef, params, state["rest"], copy=True)
            value, metrics = loss_fn(model, batch)
            return value, (nnx.state(model, nnx.Not(nnx.Param)), metrics)

        grads, (rest, metrics) = jax.grad(loss, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        new = {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}
        return new, metrics

    return train_step


def vqvae_batch_loss(data_variance: float):
    """loss_fn for make_train_step: the VQ-VAE loss on a batch of uint8 images."""

    def loss_fn(model, batch):
        x = to_model_range(batch["image"])  # (B, H, W, C)
        return vqvae_loss(model, x, train=True, data_variance=data_variance)

    return loss_fn


def make_eval_step(graphdef):
    """(params, rest, batch) -> per-image MSE (B,), token ids (B, h, w), uint8 reconstruction."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        x = to_model_range(batch["image"])
        out = model(x)
        per_image = jnp.mean(jnp.square(out.reconstruction - x), axis=(1, 2, 3))  # (B,)
        return per_image, out.indices, to_uint8(out.reconstruction)

    return eval_step


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse settings that would lose work or crash later, each with a one-line reason."""

    def need(key: str, low: int, why: str) -> None:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key} must be an integer >= {low} ({why}), got {value!r}")

    need("steps", 1, "the number of training steps")
    need("batch_size", 1, "images per step")
    need("checkpoint_every", 1, "checkpoints are what a run resumes from")
    need("keep_checkpoints", 1, "at least the latest checkpoint is kept")
    need("log_every", 0, "0: no periodic logging")
    need("eval_every", 0, "0: no evaluation")
    need("eval_batches", 0, "0: every held-out example once")
    if config.eval_every:
        need("eval_batch_size", 1, "held-out images per evaluation batch")
    need("num_devices", 0, "0: every device")


class Trainer:
    """Builds sharded state from a config, restores the latest checkpoint, runs the loop.

    This one trains the VQ-VAE; a subclass trains another model by overriding the hooks
    ``_model_config``, ``_data_stats``, ``loss_fn``, ``_train_batches``, ``evaluate`` and
    ``_meta``.
    """

    kind = "vqvae"

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | Path,
        arrays=None,
        stop: StopRequest | None = None,
    ):
        check_config(config)
        self.config, self.arrays = config, arrays
        self.workdir = Path(workdir).expanduser()
        self.stop = stop or StopRequest()
        self.model_config = self._model_config()
        self.mesh = make_mesh(config.get("num_devices") or None)
        check_batch_size(config.batch_size, self.mesh)
        if config.eval_every:
            check_batch_size(config.eval_batch_size, self.mesh, "eval_batch_size")
        self.tx = make_optimizer(config.optim, config.steps)

        def init():
            model = self.model_config.build(nnx.Rngs(config.seed))
            _, params, rest = nnx.split(model, nnx.Param, ...)
            step = jnp.zeros((), jnp.int32)
            return {"params": params, "rest": rest, "opt": self.tx.init(params), "step": step}

        abstract_model = nnx.eval_shape(lambda: self.model_config.build(nnx.Rngs(0)))
        self.graphdef = nnx.graphdef(abstract_model)
        abstract = jax.eval_shape(init)
        self.shardings = state_shardings(abstract, self.mesh, fsdp=config.get("fsdp", False))
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.shardings,
        )
        self.init_state = jax.jit(init, out_shardings=self.shardings)

    # --- hooks -------------------------------------------------------------------------
    def _model_config(self):
        """The model's config dataclass (``build(rngs)``, ``to_dict()``)."""
        return VQVAEConfig.from_dict(dict(self.config.model))

    def loss_fn(self, data_variance: float):
        scale = data_variance if self.config.loss.normalize_by_variance else 1.0
        return vqvae_batch_loss(scale)

    def _train_batches(self, start: int):
        """Global sharded training batches from step ``start`` on."""
        source = self.train_source
        return data_lib.global_batches(
            source, self.config.batch_size, batch_sharding(self.mesh), start
        )

    # --- state -------------------------------------------------------------------------
    @functools.cached_property
    def ckpt(self) -> Checkpoints:
        """The workdir's checkpoints (the workdir is created on first use)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return Checkpoints(self.workdir, max_to_keep=self.config.keep_checkpoints)

    def _meta(self, data_variance: float) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model_config.to_dict(),
            "config": self.config.to_dict(),
            "data_variance": data_variance,
            "data": {
                "source": self.config.data.source,
                "seed": self.config.seed,
                "val_fraction": self.config.data.val_fraction,
            },
        }

    def restore_or_init(self) -> tuple[dict, float]:
        """The newest intact checkpoint's state (and data variance), or fresh state.

        A damaged checkpoint is moved to ``WORKDIR/damaged/`` (never deleted), said in one
        line, and the one before it is tried.
        """
        a = self.abstract_state
        damaged = []
        for step in self.ckpt.steps():
            try:
                if self.ckpt.meta(step)["model"] != self.model_config.to_dict():
                    raise ValueError(
                        f"{self.workdir} holds checkpoint {step} of a different model; use a "
                        "new --workdir (or the config it was trained with)"
                    )
                model, train, meta = self.ckpt.restore(
                    step,
                    {"params": a["params"], "rest": a["rest"]},
                    {"opt": a["opt"], "step": a["step"]},
                )
            except DamagedCheckpoint as e:
                where = self.ckpt.set_aside(step)
                log.warning("skipped %s; moved it to %s", e, where)
                damaged.append(step)
                continue
            log.info("resumed from step %d", step)
            return {**model, **train}, float(meta["data_variance"])
        if damaged:
            log.warning("no intact checkpoint left: starting again from step 0")
        state = self.init_state()
        if self.config.get("kmeans_init", False):
            state = self._kmeans_init(state)
        return state, self._data_stats()

    def _kmeans_init(self, state: dict) -> dict:
        """Codebook (and EMA state) from k-means on the encoder's outputs for batch 0."""
        graphdef = self.graphdef
        key = jax.random.fold_in(jax.random.key(self.config.seed), 1)

        def init(params, rest, images):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.quantizer.init_from_batch(model.encode(to_model_range(images)), key)
            return nnx.state(model, nnx.Not(nnx.Param))

        batch = next(self._train_batches(0))  # the first step's batch
        fn = jax.jit(init, out_shardings=self.shardings["rest"])
        with jax.set_mesh(self.mesh):
            rest = fn(state["params"], state["rest"], batch["image"])
        log.info("codebook initialised by k-means on the first batch")
        return {**state, "rest": rest}

    def _data_stats(self, batches: int = 8, batch_size: int = 256) -> float:
        """Pixel variance of a few thousand training images, for the normalised MSE."""
        src = self.train_source
        n = total = total_sq = 0.0
        first = data_lib.host_batches(src, batch_size)  # a separate pass: no effect on training
        for _, host in zip(range(batches), first, strict=False):
            x = host["image"].astype(np.float64) / 255.0
            n, total, total_sq = n + x.size, total + x.sum(), total_sq + np.square(x).sum()
        return float(total_sq / n - (total / n) ** 2)

    @functools.cached_property
    def train_source(self):
        return self._source(train=True)

    @functools.cached_property
    def _sources(self) -> list:
        """Every source this trainer made, for the end-of-run count of skipped files."""
        return []

    def _source(self, train: bool):
        d, m = self.config.data, self.model_config
        source = data_lib.make_source(
            d.source,
            image_size=m.image_size,
            channels=m.channels,
            train=train,
            seed=self.config.seed,
            arrays=self.arrays,
            val_fraction=d.val_fraction,
            data_dir=d.get("data_dir") or None,
            download=d.get("download", False),
        )
        self._sources.append(source)
        return source

    def compile_step(self, data_variance: float):
        """The train step, jitted with this mesh's shardings; the input state is donated."""
        return jax.jit(
            make_train_step(self.graphdef, self.tx, self.loss_fn(data_variance)),
            in_shardings=(self.shardings, batch_sharding(self.mesh)),
            out_shardings=(self.shardings, replicated(self.mesh)),
            donate_argnums=0,
        )

    # --- loop --------------------------------------------------------------------------
    def _starting_stopped(self) -> bool:
        """A signal during start-up (restore, compile): stop before training, said once."""
        if self.stop.signal is None:
            return False
        log.warning(
            "%s during start-up: stopped before training; nothing new to save", self.stop.name
        )
        return True

    def train(self) -> dict:
        """Run to ``config.steps``; returns the last evaluation's metrics ({} if none ran).

        Holds the workdir's lock for the whole run. SIGTERM or SIGINT stops it cleanly: in
        start-up before anything is written, later after saving the current step.
        """
        with self.stop.installed():
            if self._starting_stopped():
                return {}
            self.workdir.mkdir(parents=True, exist_ok=True)
            lock = WorkdirLock(self.workdir) if jax.process_index() == 0 else None
            with lock or contextlib.nullcontext():
                return self._run()

    def _run(self) -> dict:
        cfg = self.config
        self.train_source  # noqa: B018  (built first: bad data input fails before anything)
        if cfg.eval_every:
            self._prepare_eval()
        log.info(
            "starting: %s, %d process(es), %d device(s) (%s)",
            self.workdir,
            jax.process_count(),
            self.mesh.size,
            jax.devices()[0].platform,
        )
        state, data_variance = self.restore_or_init()
        self.data_variance = data_variance
        start = int(state["step"])
        batches = self._train_batches(start)
        step_fn = self.compile_step(data_variance)
        if self._starting_stopped():
            return {}
        meta = self._meta(data_variance)
        metrics_log = MetricsLog(self.workdir, start, cfg.get("tensorboard", True))
        progress = Progress(cfg.steps, start, cfg.batch_size)
        last_saved, eval_metrics = start, {}
        try:
            with jax.set_mesh(self.mesh):
                for step in range(start + 1, cfg.steps + 1):
                    state, metrics = step_fn(state, next(batches))
                    # read once: a signal landing later in this step is acted on at the next
                    stop = self.stop.signal
                    last = step == cfg.steps or stop is not None
                    save = step % cfg.checkpoint_every == 0 or last
                    if (cfg.log_every and step % cfg.log_every == 0) or save:
                        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        if not _finite(host):
                            raise TrainingDiverged(
                                f"loss is not finite at step {step} ({host['loss']}); stopped. "
                                f"The last good checkpoint (step {last_saved}) is kept in "
                                f"{self.workdir}"
                            )
                        metrics_log.write(step, "train", host)
                        progress.update(step, host["loss"])
                    if save:  # before evaluating: an evaluation that fails loses nothing
                        self.ckpt.save(
                            step,
                            {k: state[k] for k in ("params", "rest")},
                            {"opt": state["opt"], "step": state["step"]},
                            meta,
                        )
                        last_saved = step
                    if cfg.eval_every and (step % cfg.eval_every == 0 or last):
                        eval_metrics = self.evaluate(state, step)
                        metrics_log.write(step, "eval", eval_metrics)
                    if stop is not None:
                        name = self.stop.name
                        log.warning("%s: saved step %d; rerun to resume", name, step)
                        break
        finally:
            progress.close()
            self.ckpt.wait()
            metrics_log.close()
        self._report_skipped()
        self.state = state
        return eval_metrics

    def _report_skipped(self) -> None:
        """One line at the end of a run when unreadable image files were left out."""
        skipped = sorted(set().union(*(getattr(s, "skipped", ()) for s in self._sources)))
        if skipped:
            log.warning(
                "%d unreadable image file(s) were skipped during this run (first: %s)",
                len(skipped),
                skipped[0],
            )

    # --- evaluation --------------------------------------------------------------------
    def _prepare_eval(self) -> None:
        """Build the held-out source and read its first batch now, at start-up, so that a
        missing or unreadable held-out set fails before any training, not at step N."""
        self._eval_source = self._source(train=False)
        first, _ = next(data_lib.held_out(self._eval_source, self.config.eval_batch_size, 1))
        if not len(next(iter(first.values()))):
            raise data_lib.DataError(f"{self.config.data.source} has no readable held-out examples")
        self._eval_step = jax.jit(self._make_eval_step())

    def _make_eval_step(self):
        return make_eval_step(self.graphdef)

    def evaluate(self, state: dict, step: int) -> dict[str, float]:
        """MSE, PSNR, perplexity, codebook usage and dead codes on held-out data; a PNG grid.

        ``eval_batches`` batches, or with 0 every held-out example once.
        """
        cfg, m = self.config, self.model_config
        if not hasattr(self, "_eval_source"):
            self._prepare_eval()
        bs = cfg.eval_batch_size
        total = cfg.eval_batches * bs or self._eval_source.num_examples
        per_image, counts, first = [], np.zeros(m.num_codes), None
        for host, keep in data_lib.held_out(self._eval_source, bs, total):
            batch = jax.device_put(host, batch_sharding(self.mesh))
            err, idx, recon = self._eval_step(state["params"], state["rest"], batch)
            per_image.append(np.asarray(err)[:keep])
            counts += np.bincount(np.asarray(idx)[:keep].ravel(), minlength=m.num_codes)
            if first is None:
                first = (host["image"], np.asarray(recon))
        per_image = np.concatenate(per_image)
        mse = float(np.mean(per_image))
        health = {k: float(v) for k, v in codebook_health(jnp.asarray(counts)).items()}
        ema_counts = np.asarray(state["rest"]["quantizer"]["counts"].get_value())
        out = {
            "mse": mse,  # pixels in [0, 1]
            "normalized_mse": mse / self.data_variance,  # the VQ-VAE paper's figure
            "psnr": psnr(mse),  # of the mean MSE
            **health,
            "dead_codes": float(np.sum(ema_counts < cfg.dead_code_report_threshold)),
            "examples": float(len(per_image)),
        }
        n = min(8, len(first[0]))
        image_grid([first[0][:n], first[1][:n]], self.workdir / "eval_grid.png")
        return out
