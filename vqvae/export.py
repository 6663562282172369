"""Export token grids of a whole data source, and the codebook, for downstream models.

A token export is a folder that plain NumPy reads, with no need for this package:

    manifest.json          vocab_size, grid_shape, quantizer (kind, levels), num_examples,
                           shards, codebook sha256, ...
    tokens-00000.npz       tokens int32 (n, h, w), or (n, h, w, L) with L residual levels;
                           labels int32 (n,) (-1: no label). With an augmentation
                           (``augment``: flip, tencrop) each image's views side by side:
                           (n, A, h, w[, L]), the manifest's ``views`` naming them
                           (["none", "flip"]; tencrop: centre, corners, their mirrors);
                           the token source draws one per example and epoch (as
                           LlamaGen's pre-extracted flips and crops), held-out ones view 0
    codebook.npy           the code vectors float32, (K, D) or (L, K, D) (also in .npz)

It is written to a hidden ``.OUT.partial`` folder and renamed into place when complete, so
an interrupted export never leaves a folder that looks finished; what a killed one leaves
is removed by the next export into the same parent folder (a lock file beside each partial
folder tells a killed export's from a running one's).
"""

import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from vqvae import data as data_lib
from vqvae.errors import InvalidValueError
from vqvae.tokenizer import Tokenizer

FORMAT = "vqvae-tokens-1"
_CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")
# --augment: the views exported, view 0 first (the one held-out examples use)
AUGMENTS = {
    "none": ("none",),
    "flip": ("none", "flip"),
    "tencrop": _CROPS + tuple(f"flip_{c}" for c in _CROPS),
}
CROP_RANGE = 1.1  # ten-crop reads images this much larger, as LlamaGen's extraction does


def check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise InvalidValueError(f"augment must be one of {sorted(AUGMENTS)}, got {augment!r}")


def source_size(image_size: int, augment: str) -> int:
    """The size images are read at: the model's, or (tencrop) ``CROP_RANGE`` larger."""
    return int(image_size * CROP_RANGE) if augment == "tencrop" else image_size


def _crop(images: np.ndarray, where: str, size: int) -> np.ndarray:
    """One of torchvision's five crops of (B, S, S, C) to (B, size, size, C)."""
    full = images.shape[1]
    if where == "center":  # torchvision's rounding of the offset
        top = int(round((full - size) / 2.0))
        left = int(round((images.shape[2] - size) / 2.0))
    else:
        top = 0 if where.startswith("top") else full - size
        left = 0 if where.endswith("left") else images.shape[2] - size
    return images[:, top : top + size, left : left + size]


def views(images: np.ndarray, augment: str, size: int | None = None) -> list[np.ndarray]:
    """The augmented views of a batch (B, H, W, C) in ``AUGMENTS`` order: the images, then
    (flip) mirrored; or (tencrop) the centre and four corner crops of ``size`` and their
    mirror images (torchvision's TenCrop)."""
    check_augment(augment)
    out = []
    for v in AUGMENTS[augment]:
        x = images if v in ("none", "flip") else _crop(images, v.removeprefix("flip_"), size)
        out.append(x[:, :, ::-1] if v.startswith("flip") else x)
    return out


def _remove_killed(parent: Path) -> None:
    """Remove the ``.NAME.partial`` folders in ``parent`` that killed exports left: those
    whose lock file no running export holds."""
    for lock in parent.glob(".*.partial.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue  # its export just finished
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:  # not replaced meanwhile
                shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                lock.unlink()
        except (BlockingIOError, FileNotFoundError):
            pass  # a running export's
        finally:
            os.close(fd)


class Staging:
    """A fresh hidden folder ``tmp`` beside ``out``, locked while an export writes it:
    ``finish`` renames it to ``out``, ``abandon`` removes it. Leftovers of killed exports
    in the same parent folder are removed first."""

    def __init__(self, out: Path, flag: str = "--out"):
        self.out = out.expanduser()
        if self.out.exists():
            raise FileExistsError(f"{self.out} already exists; choose a new {flag} or remove it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _remove_killed(self.out.parent)
        self.tmp = self.out.parent / f".{self.out.name}.partial"
        self.lock = self.tmp.with_name(self.tmp.name + ".lock")
        self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FileExistsError(f"another export is writing {self.out} now") from None
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by an interrupted export
        self.tmp.mkdir()

    def finish(self) -> None:
        self.tmp.rename(self.out)
        self._release()

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self.fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def write_codebook(tokenizer: Tokenizer, folder: Path) -> dict:
    """codebook.npy and codebook.npz (codebook, sha256) in ``folder``; returns their facts."""
    codebook = tokenizer.codebook
    np.save(folder / "codebook.npy", codebook)
    np.savez(folder / "codebook.npz", codebook=codebook, sha256=tokenizer.codebook_sha256())
    return {"shape": list(codebook.shape), "sha256": tokenizer.codebook_sha256()}


def export_codebook(tokenizer: Tokenizer, out: str | Path) -> Path:
    """A folder holding only the codebook files (and a small manifest)."""
    out = Path(out)
    stage = Staging(out)
    try:
        facts = write_codebook(tokenizer, stage.tmp)
        (stage.tmp / "manifest.json").write_text(json.dumps({"codebook": facts}, indent=2))
        stage.finish()
    except BaseException:
        stage.abandon()
        raise
    return out


def export_tokens(
    tokenizer: Tokenizer,
    data: dict | str,
    out: str | Path,
    *,
    split: str = "train",
    batch_size: int = 256,
    shard_size: int = 50_000,
    workers: int = -1,
    augment: str = "none",
    log=None,
) -> dict:
    """Encode every example of a source once into token shards; returns the manifest.

    ``data``: a source spec, or a data section (``source``, ``val_fraction``, ...: a
    checkpoint's meta keeps the one it was trained on). ``workers`` decode in parallel
    (-1: as many as pay, as in training). ``augment``: ``flip`` also exports each image
    mirrored left to right; ``tencrop`` reads each image ``CROP_RANGE`` larger and exports
    its ten crops at the model's size (``AUGMENTS``).
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    if split not in ("train", "val"):
        raise InvalidValueError(f"split must be 'train' or 'val', got {split!r}")
    check_augment(augment)  # a bad name fails before any work
    data = {"source": data} if isinstance(data, str) else dict(data)
    source_spec = data["source"]
    out = Path(out).expanduser()
    source = data_lib.make_source(
        data,
        image_size=source_size(tokenizer.image_size, augment),
        channels=tokenizer.channels,
        train=split == "train",
    )
    stage = Staging(out)
    tmp = stage.tmp
    shards, pending, done, t0, shown = [], [], 0, time.time(), 0.0
    total, max_label = len(source), -1
    workers = data_lib.resolve_workers(workers, source.parallel)

    def flush():
        nonlocal max_label
        tokens = np.concatenate([t for t, _ in pending])
        labels = np.concatenate([lab for _, lab in pending])
        max_label = max(max_label, int(labels.max()))
        name = f"tokens-{len(shards):05d}.npz"
        np.savez(tmp / name, tokens=tokens, labels=labels)
        shards.append({"file": name, "num_examples": int(len(tokens))})
        pending.clear()

    skipped: set[str] = set()
    try:
        for batch in data_lib.local_examples(source, batch_size, workers, skipped):
            crops = views(batch["image"], augment, tokenizer.image_size)
            grids = [tokenizer.encode(v) for v in crops]
            grids = grids[0] if augment == "none" else np.stack(grids, axis=1)  # (n, A, ...)
            pending.append((grids, batch["label"].astype(np.int32)))
            done += len(batch["image"])
            if sum(len(t) for t, _ in pending) >= shard_size:
                flush()
            now = time.time()
            if now - shown > 2 or done >= total:
                log(f"tokens: {done}/{total} images, {done / max(now - t0, 1e-9):,.0f} img/s")
                shown = now
        if pending:
            flush()
        if not shards:
            raise InvalidValueError(f"source {source_spec} gave no images to export")
        manifest = {
            "format": FORMAT,
            "vocab_size": tokenizer.vocab_size,
            "grid_shape": list(tokenizer.grid_shape()),
            "token_shape": list(tokenizer.grid_shape()) + list(tokenizer.token_levels),
            "quantizer": tokenizer.config.get("quantizer", {"kind": "vq"}),
            "image_size": tokenizer.image_size,
            "num_examples": int(sum(s["num_examples"] for s in shards)),
            "has_labels": max_label >= 0,
            "num_classes": max_label + 1,  # 0 when nothing is labelled (all -1)
            "source": source_spec,
            "split": split,
            "augment": augment,
            "views": list(AUGMENTS[augment]),
            "read_at": source_size(tokenizer.image_size, augment),
            "skipped_files": sorted(skipped),
            # relative to this folder, so the pair can move together (no machine path)
            "tokenizer": os.path.relpath(tokenizer.workdir, out) if tokenizer.workdir else "",
            "codebook": write_codebook(tokenizer, tmp),
            "shards": shards,
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        stage.finish()
    except BaseException:
        stage.abandon()
        raise
    return manifest
