"""What a run leaves for people to read: metrics.jsonl, TensorBoard, a progress line, PNG grids.

Only process 0 writes these (the trainer creates them there alone).
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of an MSE over pixels in [0, 1]."""
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def image_grid(rows: list[np.ndarray], path: Path) -> None:
    """Write rows of uint8 images (n, H, W, C) as one PNG, atomically."""
    tiles = [np.concatenate(list(r), axis=1) for r in rows]
    grid = np.concatenate(tiles, axis=0)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)


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
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the events a resumed run writes again
            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.writes:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if not self.writes:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class Progress:
    """One line: step, loss, images/s and ETA; redrawn in place on a terminal."""

    def __init__(self, total: int, start: int, batch_size: int, enabled: bool = True):
        self.total, self.start, self.batch_size = total, start, batch_size
        self.t0, self.tty, self.enabled = time.time(), sys.stderr.isatty(), enabled

    def update(self, step: int, loss: float) -> str:
        done = step - self.start
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = done * self.batch_size / elapsed
        eta = (self.total - step) * elapsed / max(done, 1)
        bar = "#" * int(20 * step / self.total)
        line = (
            f"[{bar:<20}] step {step}/{self.total} loss {loss:.4f} "
            f"{rate:,.0f} img/s ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        )
        if self.enabled:
            print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr)
        return line

    def close(self) -> None:
        if self.tty and self.enabled:
            print(file=sys.stderr)
