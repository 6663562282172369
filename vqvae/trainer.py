"""The one training loop: a task's model trained sharded, checkpointed, resumed, evaluated.

The task (``vqvae.tasks``) says what is trained and how it is judged; this module does the
rest the same way for every task. State is created already sharded (``jax.jit(init,
out_shardings=...)``); the task's pure step is jitted once with explicit in/out shardings
and the old state donated. Every process runs the same loop on its rows of each batch
(``vqvae.data``); reductions happen inside jitted functions, only scalars come back to the
host, and process 0 alone writes the logs, the evaluation grid and the lock.
"""

import contextlib
import functools
import json
import logging
import math
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np

from vqvae import data as data_lib
from vqvae.checkpoint import CheckpointError, Checkpoints, DamagedCheckpoint, disk_full
from vqvae.distributed import STEP_TIMEOUT_S, Watchdog, abandon, peer_lost
from vqvae.errors import InvalidValueError, UserError
from vqvae.lock import WorkdirLock
from vqvae.logs import MetricsLog, Progress, image_grid
from vqvae.sharding import (
    batch_sharding,
    check_batch_size,
    local_rows,
    make_mesh,
    replicated,
    state_shardings,
)
from vqvae.signals import StopRequest
from vqvae.tasks import MODEL_KEYS, Task, make_task
from vqvae.tasks.base import make_schedule

log = logging.getLogger(__name__)


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def check_config(config: ml_collections.ConfigDict) -> None:
    """Refuse settings that would lose work or crash later, each with a one-line reason."""

    def need(key: str, low: int, why: str) -> None:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidValueError(f"{key} must be an integer >= {low} ({why}), got {value!r}")

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


def _split(state: dict) -> tuple[dict, dict]:
    """State -> the checkpoint's model item (inference) and train item (the rest)."""
    model = {k: state[k] for k in MODEL_KEYS}
    return model, {k: v for k, v in state.items() if k not in MODEL_KEYS}


TINY_HELD_OUT = 32  # held-out sets smaller than this are warned about


def _remove_if_untouched(workdir: Path, created: bool) -> None:
    """A workdir holding nothing but this run's lock file (its start-up failed or was
    stopped): the lock file goes, and the folder too where this run created it."""
    if {p.name for p in workdir.iterdir()} <= {".lock"}:
        (workdir / ".lock").unlink(missing_ok=True)
        if created:
            workdir.rmdir()


class Trainer:
    """Builds sharded state for a task, restores the newest intact checkpoint, runs the loop.

    ``task`` defaults to the one ``config.task`` names; ``arrays`` feeds the ``arrays``
    source; ``stop`` is shared with the script that installed it before a slow start.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str | Path,
        arrays=None,
        stop: StopRequest | None = None,
        task: Task | None = None,
    ):
        check_config(config)
        self.config = config
        self.workdir = Path(workdir).expanduser()
        self.stop = stop or StopRequest()
        from vqvae.finetune import prepare  # config.init_from: the source's model

        self.init_source = prepare(config)
        self.task = task or make_task(config, arrays)
        if self.init_source is not None:  # said in the checkpoints' meta
            self.task.init_from = self.init_source.record
        self.model_config = self.task.model_config
        self.lr_at = make_schedule(config.optim, config.steps)  # for the log: lr after n updates
        self.mesh = make_mesh(config.get("num_devices") or None)
        check_batch_size(config.batch_size, self.mesh)
        if config.eval_every:
            check_batch_size(config.eval_batch_size, self.mesh, "eval_batch_size")

        self.graphdef = self.task.graphdef()
        abstract = jax.eval_shape(self.task.init_state)
        self.shardings = state_shardings(abstract, self.mesh, fsdp=config.get("fsdp", False))
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            self.shardings,
        )
        self.init_state = jax.jit(self.task.init_state, out_shardings=self.shardings)

    # --- sources and state ----------------------------------------------------------------
    @functools.cached_property
    def ckpt(self) -> Checkpoints:
        """The workdir's checkpoints (the workdir is created on first use)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        return Checkpoints(self.workdir, max_to_keep=self.config.keep_checkpoints)

    @functools.cached_property
    def train_source(self):
        return self.task.source(train=True)

    @functools.cached_property
    def eval_source(self):
        """The held-out source (``data.val_source`` in full where set); a warning when it is
        too small for its figures to mean much."""
        source = self.task.source(train=False)
        if len(source) < TINY_HELD_OUT:
            d = self.config.data
            log.warning(
                "held-out set: only %d example(s) (%s); its figures are noisy: set "
                "data.val_source or a larger data.val_fraction",
                len(source),
                d.get("val_source") or f"data.val_fraction={d.get('val_fraction')} of {d.source}",
            )
        return source

    def train_batches(self, start: int, saved: dict | None = None) -> data_lib.TrainBatches:
        """Global training batches from step ``start`` on (``saved``: a checkpoint's data
        position, for grain's iterator state)."""
        cfg = self.config
        return data_lib.TrainBatches(
            self.train_source,
            cfg.data,
            cfg.batch_size,
            cfg.seed,
            batch_sharding(self.mesh),
            start,
            saved,
            self.task.host_fn(),
        )

    def restore_or_init(self) -> tuple[dict, dict | None, int | None]:
        """(state, meta, step) of the newest intact checkpoint, or (fresh state, None, None).

        A damaged checkpoint is moved to ``WORKDIR/damaged/`` (never deleted), said in one
        line, and the one before it is tried. Sets the task's stats either way.
        """
        a = self.abstract_state
        model_abstract, train_abstract = _split(a)
        damaged = []
        for step in self.ckpt.steps():
            try:
                if not self._same_model(self.ckpt.meta(step)["model"]):
                    raise InvalidValueError(
                        f"{self.workdir} holds checkpoint {step} of a different model; use a "
                        "new --workdir (or the config it was trained with)"
                    )
                model, train, meta = self.ckpt.restore(step, model_abstract, train_abstract)
            except DamagedCheckpoint as e:
                where = self.ckpt.set_aside(step)
                log.warning("skipped %s; moved it to %s", e, where)
                damaged.append(step)
                continue
            log.info("resumed from step %d", step)
            self.task.stats = self.task.restore_stats(meta)
            return {**model, **train}, meta, step
        if damaged:
            log.warning("no intact checkpoint left: starting again from step 0")
        self.task.stats = self.task.compute_stats(self.train_source)
        if jax.process_count() > 1:  # one loss for all: process 0's figures
            from jax.experimental import multihost_utils

            stats = multihost_utils.broadcast_one_to_all(self.task.stats)
            self.task.stats = {k: float(v) for k, v in stats.items()}
        state = self.init_state()
        if self.init_source is not None:  # fine-tuning: its weights, a fresh optimizer
            state = self.init_source.apply(state, self.shardings)
        if self.config.get("kmeans_init", False):
            with self.train_batches(0) as first, jax.set_mesh(self.mesh):
                state = self.task.first_state(state, next(first), self.graphdef, self.shardings)
        return state, None, None

    def _same_model(self, saved: dict) -> bool:
        """Whether a checkpoint's model config is this run's (read as its config class, so
        an older layout of the same model counts as the same)."""
        try:
            return type(self.model_config).from_dict(saved) == self.model_config
        except (TypeError, ValueError):
            return False

    @functools.cached_property
    def consts(self):
        """The task's constants, replicated over the mesh."""
        return jax.device_put(self.task.constants(), replicated(self.mesh))

    def compile_step(self):
        """The task's train step, jitted with this mesh's shardings; the input state is
        donated. Call after the task's stats are set (the loss may close over them).
        Called as ``step(state, batch, self.consts)``."""
        return jax.jit(
            self.task.train_step(self.graphdef),
            in_shardings=(self.shardings, batch_sharding(self.mesh), replicated(self.mesh)),
            out_shardings=(self.shardings, replicated(self.mesh)),
            donate_argnums=0,
        )

    # --- loop -----------------------------------------------------------------------------
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
            fresh = not self.workdir.exists() or not any(self.workdir.iterdir())
            created = not self.workdir.exists()
            self.workdir.mkdir(parents=True, exist_ok=True)
            lock = WorkdirLock(self.workdir) if jax.process_index() == 0 else None
            try:
                # every pipeline's unreadable files, each warned about once and counted once
                with (
                    lock or contextlib.nullcontext(),
                    data_lib.unreadable_files() as self.unreadable,
                ):
                    return self._run()
            except CheckpointError:
                raise
            except OSError as e:  # a full disk met by the logs or an image: one line too
                if not disk_full(e):
                    raise
                raise self.ckpt.disk_full(e) from None
            finally:
                if fresh and lock is not None:  # a start-up that failed leaves nothing behind
                    _remove_if_untouched(self.workdir, created)

    def _run(self) -> dict:
        cfg = self.config
        self.train_source  # noqa: B018  (built first: bad data input fails before anything)
        if cfg.eval_every:
            self._check_eval_source()
        log.info(
            "starting: %s, %d process(es), %d device(s) (%s)",
            self.workdir,
            jax.process_count(),
            self.mesh.size,
            jax.devices()[0].platform,
        )
        state, meta, restored = self.restore_or_init()
        start = int(state["step"])
        self._best = self._best_so_far(restored)
        if not self._eval_missing(start) and self._nothing_to_do(start):
            self.state = state
            return {}
        batches = self._resume_batches(start, meta, restored)
        try:
            with jax.set_mesh(self.mesh):  # compiled now: a signal meanwhile is still start-up
                step_fn = self.compile_step().lower(state, batches.peek(), self.consts).compile()
            if self._starting_stopped():
                return {}
            return self._loop(state, start, step_fn, batches)
        finally:
            batches.close()

    def _resume_batches(self, start: int, meta: dict | None, restored: int | None):
        """The training stream, at the restored checkpoint's position (grain's state where
        the layout is unchanged, else positioned from the step alone)."""
        saved = (meta or {}).get("data_position")
        batches = self.train_batches(start, saved)
        if batches.restore_state and not self.ckpt.restore_data(restored, batches.grain_iterator):
            batches.close()
            batches = self.train_batches(start)
        log.info(
            "data: %s, %d example(s), %d decoding worker(s) per process, %d batch(es) ahead",
            self.config.data.source,
            len(self.train_source),
            batches.workers,
            batches.workers * data_lib.BUFFER_PER_WORKER,
        )
        return batches

    def _save(self, step: int, state: dict, meta: dict, batches) -> int:
        """A checkpoint of ``state`` at ``step``, with the data stream's position: -> step."""
        model, train = _split(state)
        meta = {**meta, "data_position": batches.position()}
        self.ckpt.save(step, model, train, meta, data_iterator=batches.grain_iterator)
        log.info("saving checkpoint %d in %s", step, self.ckpt.directory)
        return step

    def _evaluate_logged(self, step: int, state: dict, metrics_log) -> tuple[dict, bool]:
        """Evaluate, log the figures and views: -> (metrics, whether to stop early)."""
        eval_metrics = self.evaluate(state)
        metrics_log.write(step, "eval", eval_metrics)
        metrics_log.views(step, self.eval_views)
        return eval_metrics, self._after_eval(step, state, eval_metrics)

    def _loop(self, state, start: int, step_fn, batches) -> dict:
        cfg = self.config
        primary = jax.process_index() == 0
        metrics_log = MetricsLog(self.workdir, start, cfg.get("tensorboard", True), primary)
        progress = Progress(cfg.steps, start, cfg.batch_size, enabled=primary)
        timeout = cfg.get("step_timeout_s", STEP_TIMEOUT_S)
        watchdog = self.watchdog = Watchdog(timeout, "waiting for a step")
        meta = self.task.meta()
        last_saved, eval_metrics, waited = start, {}, 0.0
        try:
            with jax.set_mesh(self.mesh):
                stop_early = False
                if self._eval_missing(start):  # killed between saving the step and evaluating it
                    log.info("evaluating step %d: the run that saved it stopped first", start)
                    eval_metrics, stop_early = self._evaluate_logged(start, state, metrics_log)
                for step in range(start + 1, cfg.steps + 1):
                    if stop_early:  # the restored step's evaluation already says stop
                        break
                    state, metrics = step_fn(state, next(batches), self.consts)
                    # read once: a signal landing later in this step is acted on at the next
                    stop = self.stop.signal
                    last = step == cfg.steps or stop is not None
                    save = step % cfg.checkpoint_every == 0 or last
                    if (cfg.log_every and step % cfg.log_every == 0) or save:
                        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        watchdog.beat()
                        if not _finite(host):
                            raise TrainingDiverged(
                                f"loss is not finite at step {step} ({host['loss']}); stopped. "
                                f"The last good checkpoint (step {last_saved}) is kept in "
                                f"{self.workdir}"
                            )
                        host["lr"] = float(self.lr_at(step - 1))  # the rate this step used
                        host["data_wait_s"] = batches.wait_seconds - waited
                        host["unreadable_files"] = float(len(self.unreadable))
                        waited = batches.wait_seconds
                        metrics_log.write(step, "train", host)
                        progress.update(step, host["loss"], lr=host["lr"])
                    if save:  # before evaluating: an evaluation that fails loses nothing
                        last_saved = self._save(step, state, meta, batches)
                        if jax.process_count() > 1:
                            watchdog.start()  # once the first save's one-time compiles are done
                    if cfg.eval_every and (step % cfg.eval_every == 0 or last):
                        eval_metrics, stop_early = self._evaluate_logged(step, state, metrics_log)
                        if stop_early and last_saved != step:
                            last_saved = self._save(step, state, meta, batches)
                        if stop_early:
                            break
                    watchdog.beat()
                    if stop is not None:
                        log.warning("%s: saved step %d; rerun to resume", self.stop.name, step)
                        break
        except jax.errors.JaxRuntimeError as e:
            if peer_lost(e):
                abandon(
                    f"another process stopped during training ({str(e).splitlines()[0][:120]})"
                    f". Rerun every process to resume from checkpoint {last_saved}"
                )  # the same words as distributed.PEER_HINT, with the step
            raise
        finally:
            # each closer runs even when one before it raises (a checkpoint write that met
            # a full disk): a writer left open keeps a thread that dies noisily at exit
            with contextlib.ExitStack() as closing:
                closing.callback(metrics_log.close)
                if "best_ckpt" in self.__dict__:
                    closing.callback(self.best_ckpt.wait)
                closing.callback(self.ckpt.wait)
                closing.callback(progress.close)
                closing.callback(watchdog.stop)
        self._report_unreadable()
        self.state = state
        return eval_metrics

    def _report_unreadable(self) -> None:
        """One line at the end of a run when unreadable files were left out (training and
        held-out ones alike, each counted once)."""
        met = sorted(self.unreadable)
        if met:
            log.warning(
                "%d unreadable file(s) were skipped during this run (first: %s)", len(met), met[0]
            )

    def _eval_missing(self, step: int) -> bool:
        """Whether the restored ``step`` is an evaluation step with no evaluation in
        metrics.jsonl: the run that saved it was killed before evaluating it (the save
        comes first), and a rerun would otherwise never evaluate it."""
        cfg = self.config
        if step == 0 or not cfg.eval_every or (step % cfg.eval_every and step != cfg.steps):
            return False
        missing = True
        if jax.process_index() == 0:  # the one that writes the history
            path = self.workdir / "metrics.jsonl"
            for line in path.read_text().splitlines() if path.is_file() else []:
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("step") == step:
                        missing &= record.get("split") != "eval"
        if jax.process_count() > 1:  # every process evaluates, or none
            from jax.experimental import multihost_utils

            missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
        return missing

    # --- what an evaluation decides: the console line, the best checkpoint, early stop ----
    @functools.cached_property
    def best_ckpt(self) -> Checkpoints:
        """``WORKDIR/best``: the checkpoint of the best held-out ``task.best_metric`` so far
        (a workdir of its own: ``load_model``, ``sample.py`` and ``load`` read it as one)."""
        return Checkpoints(self.workdir / "best", max_to_keep=1)

    def _keeps_best(self) -> bool:
        return bool(self.task.best_metric) and bool(self.config.get("keep_best", False))

    def _best_so_far(self, restored: int | None) -> dict | None:
        """The best evaluation kept in ``WORKDIR/best`` ({"step", "value", ...}) if it is
        part of the history resumed (its step is not after the checkpoint restored);
        otherwise ``WORKDIR/best`` is cleared and the best is tracked anew."""
        folder = self.workdir / "best"
        if not self._keeps_best() or not folder.is_dir():
            return None
        try:
            steps = self.best_ckpt.steps()
            record = self.best_ckpt.meta(steps[0]).get("best") if steps else None
        except CheckpointError as e:  # unreadable: tracked anew, said once
            log.warning("%s; tracking the best anew", e)
            record = None
        if record and restored is not None and record["step"] <= restored:
            return record
        if jax.process_index() == 0:  # from a history this run does not continue
            shutil.rmtree(folder)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("best_cleared")
        self.__dict__.pop("best_ckpt", None)
        return None

    def _early_stop_rise(self, value: float, best: dict | None) -> float:
        """How far ``value`` is above the best, as a fraction of the best (0 without one)."""
        if best is None or not math.isfinite(value):
            return 0.0
        return (value - best["value"]) / max(abs(best["value"]), 1e-12)

    def _nothing_to_do(self, start: int) -> bool:
        """A finished run, or one that stopped early and would stop again: said in one line."""
        cfg = self.config
        if start >= cfg.steps:
            log.info("already at step %d of %d: nothing to do", start, cfg.steps)
            return True
        stopped = self.workdir / "best" / "stopped.json"
        limit = cfg.get("early_stop_rise", 0.0)
        if not (self._keeps_best() and limit and self._best and stopped.is_file()):
            return False
        record = json.loads(stopped.read_text())
        if record["step"] != start or record["rise"] <= limit:
            return False
        log.info(
            "stopped early at step %d of %d (held-out %s %.4g, %.0f%% above the best %.4g at "
            "step %d): nothing to do; the best checkpoint is in %s",
            start,
            cfg.steps,
            record["metric"],
            record["value"],
            100 * record["rise"],
            self._best["value"],
            self._best["step"],
            self.workdir / "best",
        )
        return True

    def _after_eval(self, step: int, state: dict, metrics: dict[str, float]) -> bool:
        """Say the evaluation in one line; keep the best checkpoint; True: stop early (the
        held-out figure rose more than ``early_stop_rise`` above its best)."""
        name = self.task.best_metric
        line = f"eval at step {step}: {self.task.eval_summary(metrics)}"
        if not self._keeps_best() or name not in metrics:
            log.info(line)
            return False
        value, best = metrics[name], self._best
        if best is None or value < best["value"]:
            self._best = {"metric": name, "step": step, "value": value}
            model, _ = _split(state)
            meta = {**self.task.meta(), "best": self._best, "eval": metrics}
            self.best_ckpt.save(step, model, {"step": state["step"]}, meta)
            log.info("%s; the best so far: saving it in %s", line, self.workdir / "best")
            return False
        rise, limit = self._early_stop_rise(value, best), self.config.get("early_stop_rise", 0.0)
        log.info("%s; the best: %.4g at step %d", line, best["value"], best["step"])
        if not limit or rise <= limit:
            return False
        if jax.process_index() == 0:
            record = {"metric": name, "step": step, "value": value, "rise": rise}
            (self.workdir / "best" / "stopped.json").write_text(json.dumps(record))
        log.warning(
            "held-out %s rose to %.4g, %.0f%% above its best %.4g (step %d; early_stop_rise "
            "%g): stopped at step %d of %d. The best checkpoint is in %s",
            name,
            value,
            100 * rise,
            best["value"],
            best["step"],
            limit,
            step,
            self.config.steps,
            self.workdir / "best",
        )
        return True

    # --- evaluation -----------------------------------------------------------------------
    def _check_eval_source(self) -> None:
        """Build the held-out source and read its first batch now, at start-up, so that a
        missing or unreadable held-out set fails before any training, not at step N."""
        first = data_lib.local_examples(self.eval_source, 1)
        try:
            next(first)
        finally:
            first.close()

    @functools.cached_property
    def _eval_fns(self):
        task, graphdef = self.task, self.graphdef
        rep = replicated(self.mesh)
        add = jax.jit(lambda a, b: jax.tree.map(jax.numpy.add, a, b), out_shardings=rep)
        sums = jax.jit(task.eval_step(graphdef), out_shardings=rep)
        finish = jax.jit(task.eval_finish, out_shardings=rep)
        preview = task.preview(graphdef)
        preview = preview and jax.jit(preview, out_shardings=batch_sharding(self.mesh))
        return sums, add, finish, preview

    def evaluate(self, state: dict) -> dict[str, float]:
        """The task's held-out metrics: ``eval_batches`` batches, or with 0 every held-out
        example once. Sums stay on the devices; only the final scalars come back. Process 0
        writes the evaluation grid (its own rows of the first batch)."""
        cfg = self.config
        sums_fn, add, finish, preview = self._eval_fns
        n = len(self.eval_source)
        total = min(cfg.eval_batches * cfg.eval_batch_size, n) if cfg.eval_batches else n
        workers = data_lib.resolve_workers(cfg.data.get("workers", -1), self.eval_source.parallel)
        acc, grid = None, None
        batches = data_lib.held_out(
            self.eval_source,
            cfg.eval_batch_size,
            total,
            batch_sharding(self.mesh),
            workers,
            self.task.host_fn(),
        )
        with jax.set_mesh(self.mesh):
            for batch, host in batches:
                sums = sums_fn(state, batch)
                if hasattr(self, "watchdog"):
                    self.watchdog.beat()
                acc = sums if acc is None else add(acc, sums)
                if grid is None and preview is not None:
                    grid = (host["image"], local_rows(preview(state, batch)))
            out = finish(acc, state)
        metrics = {k: float(np.asarray(v.addressable_data(0))) for k, v in out.items()}
        self.eval_views = {}  # for TensorBoard: the grid written and the code counts
        if grid is not None and jax.process_index() == 0:
            k = min(8, len(grid[0]))
            path = self.workdir / "eval_grid.png"
            self.eval_views["grid"] = image_grid([grid[0][:k], grid[1][:k]], path)
        if "counts" in acc:
            self.eval_views["code_counts"] = np.asarray(acc["counts"].addressable_data(0))
        return self.task.host_metrics(metrics)
