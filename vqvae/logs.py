"""What a run leaves for people to read: metrics.jsonl, TensorBoard, a progress line, PNG grids.

Only process 0 writes these (the trainer creates them there alone).
"""

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vqvae.errors import InvalidValueError


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of an MSE over pixels in [0, 1]."""
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


GRID_TILE_PX = 96  # smaller images are enlarged (nearest neighbour) to about this size
GRID_BORDER_PX = 2  # white lines between and around the tiles


def grid_array(rows: list[np.ndarray], tile_px: int = GRID_TILE_PX, border: int = GRID_BORDER_PX):
    """Rows of uint8 images (n, H, W, C) -> one uint8 image (H', W', C) for people to read.

    Images under ``tile_px`` on their longer side are enlarged by a whole factor with
    nearest neighbour (pixels stay sharp squares); ``border`` px of white separate them.
    Rows may hold different numbers of images; the missing tiles stay white.
    """
    rows = [np.asarray(r) for r in rows if len(r)]
    if not rows:
        raise InvalidValueError("image_grid: no images")
    h, w, c = rows[0].shape[1:]
    scale = max(1, -(-tile_px // max(h, w)))  # ceil: 32 px -> 3x, 16 px -> 6x
    th, tw = h * scale, w * scale
    cols = max(len(r) for r in rows)
    out = np.full(
        (border + len(rows) * (th + border), border + cols * (tw + border), c), 255, np.uint8
    )
    for i, row in enumerate(rows):
        big = row.repeat(scale, axis=1).repeat(scale, axis=2)
        for j, tile in enumerate(big):
            y, x = border + i * (th + border), border + j * (tw + border)
            out[y : y + th, x : x + tw] = tile
    return out


def image_grid(rows: list[np.ndarray], path: Path) -> np.ndarray:
    """Write rows of uint8 images (n, H, W, C) as one PNG (see ``grid_array``), atomically;
    returns the grid written."""
    grid = grid_array(rows)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
    tmp.replace(path)
    return grid


def trim_history(path: Path, step: int) -> int:
    """Keep the records of ``path`` (JSON lines) up to ``step``; returns how many were dropped.

    A run that resumes from checkpoint ``step`` replays the steps after it, so their old
    records (and a line torn by a kill) go. The file is replaced atomically.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


class MetricsLog:
    """metrics.jsonl and TensorBoard event files in the workdir, as one history.

    ``start`` is the step the run resumes from: records after it are dropped from both.
    Only the process that ``writes`` (process 0) touches the files.
    """

    def __init__(self, workdir: Path, start: int, tensorboard: bool = True, writes: bool = True):
        self.writes = writes
        if not writes:
            return
        trim_history(workdir / "metrics.jsonl", start)
        self.jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
        self.tb = None
        if tensorboard:
            self.tb = Events(workdir / "tensorboard", purge_step=start + 1)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.writes:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self.tb.scalars(step, {f"{split}/{k}": v for k, v in metrics.items()})

    def views(self, step: int, views: dict) -> None:
        """An evaluation's pictures: ``grid`` (the evaluation grid) and ``code_counts``."""
        if "grid" in views:
            self.image(step, "eval/grid", views["grid"])
        if "code_counts" in views:
            self.code_usage(step, views["code_counts"])

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 image (H, W, C) in TensorBoard's Images tab (the evaluation grid)."""
        if self.writes and self.tb is not None:
            self.tb.image(step, tag, image)

    def code_usage(self, step: int, counts: np.ndarray, max_bins: int = 512) -> None:
        """How often each code was used, (levels, K) counts, as TensorBoard histograms over
        the code ids (one per level; neighbouring ids are summed past ``max_bins``)."""
        if not (self.writes and self.tb is not None):
            return
        counts = np.asarray(counts, np.float64).reshape(-1, np.shape(counts)[-1])
        for level, c in enumerate(counts):
            k = len(c)
            width = -(-k // max_bins)
            pad = np.pad(c, (0, -k % width))
            binned = pad.reshape(-1, width).sum(axis=1)
            ids = np.arange(k, dtype=np.float64)
            n = c.sum()
            tag = "codes/usage" if len(counts) == 1 else f"codes/usage_level{level}"
            self.tb.histogram_raw(
                step,
                tag,
                min=0.0,
                max=float(k - 1),
                num=float(n),
                sum=float(ids @ c),
                sum_squares=float((ids * ids) @ c),
                bucket_limits=(np.arange(1, len(binned) + 1) * width - 0.5).tolist(),
                bucket_counts=binned.tolist(),
            )

    def close(self) -> None:
        if not self.writes:
            return
        try:
            self.jsonl.close()
        finally:
            if self.tb is not None:
                self.tb.close()


class Events:
    """A TensorBoard event file written in the caller's thread, flushed after each record.

    No background writer: an error (a full disk) is raised by the call that met it, and
    nothing is left running to fail at exit. ``purge_step``: TensorBoard hides what an
    earlier run of the same folder logged from that step on (a resumed run logs it again).
    """

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(Path(logdir) / "events"))  # writes the file version
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._writer.write_event(Event(step=purge_step, session_log=start))
        self._writer.flush()

    def _write(self, step: int, summaries: list) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        merged = Summary(value=[v for s in summaries for v in s.value])
        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=merged))
        self._writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from tensorboardX.summary import scalar

        self._write(step, [scalar(tag, float(v)) for tag, v in values.items()])

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A uint8 image (H, W, C)."""
        from tensorboardX.summary import image as image_summary

        self._write(step, [image_summary(tag, image, dataformats="HWC")])

    def histogram_raw(self, step: int, tag: str, **counts) -> None:
        """A histogram from its bucket limits and counts (TensorBoard's Histograms tab)."""
        from tensorboardX.summary import histogram_raw

        self._write(step, [histogram_raw(tag, **counts)])

    def close(self) -> None:
        self._writer.close()


class Progress:
    """One line: step, loss, learning rate, images/s and ETA; redrawn in place on a terminal.

    On a terminal, a log record that comes while the line is drawn starts on a line of its
    own (a filter on the root logger's handlers ends the progress line first).
    """

    def __init__(self, total: int, start: int, batch_size: int, enabled: bool = True):
        self.total, self.start, self.batch_size = total, start, batch_size
        self.t0, self.tty, self.enabled = time.time(), sys.stderr.isatty(), enabled
        self.pending = False  # a progress line is drawn without its newline
        self._handlers = list(logging.getLogger().handlers) if self.tty and enabled else []
        for h in self._handlers:
            h.addFilter(self._end_line)

    def _end_line(self, record: logging.LogRecord) -> bool:
        if self.pending:
            print(file=sys.stderr, flush=True)
            self.pending = False
        return True

    def update(self, step: int, loss: float, lr: float | None = None) -> str:
        done = step - self.start
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = done * self.batch_size / elapsed
        eta = (self.total - step) * elapsed / max(done, 1)
        bar = "#" * int(20 * step / self.total)
        line = (
            f"[{bar:<20}] step {step}/{self.total} loss {loss:.4f} "
            + (f"lr {lr:.3g} " if lr is not None else "")
            + f"{rate:,.0f} img/s ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        )
        if self.enabled:
            end = "" if self.tty else "\n"
            print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)
            self.pending = self.tty
        return line

    def close(self) -> None:
        for h in self._handlers:
            h.removeFilter(self._end_line)
        self._end_line(None)
