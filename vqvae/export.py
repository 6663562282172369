"""Export token grids of a whole data source, and the codebook, for downstream models.

A token export is a folder that plain NumPy reads, with no need for this package:

    manifest.json          vocab_size, grid_shape, quantizer (kind, levels), num_examples,
                           shards, codebook sha256, ...
    tokens-00000.npz       tokens int32 (n, h, w), or (n, h, w, L) with L residual levels;
                           labels int32 (n,) (-1: no label)
    codebook.npy           the code vectors float32, (K, D) or (L, K, D) (also in .npz)

It is written to a temporary folder and renamed into place when complete, so an
interrupted export never leaves a folder that looks finished.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from vqvae import data as data_lib
from vqvae.tokenizer import Tokenizer

FORMAT = "vqvae-tokens-1"


def _staging(out: Path) -> Path:
    out = out.expanduser()
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new --out or remove it")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted export
    tmp.mkdir(parents=True)
    return tmp


def write_codebook(tokenizer: Tokenizer, folder: Path) -> dict:
    """codebook.npy and codebook.npz (codebook, sha256) in ``folder``; returns their facts."""
    codebook = tokenizer.codebook
    np.save(folder / "codebook.npy", codebook)
    np.savez(folder / "codebook.npz", codebook=codebook, sha256=tokenizer.codebook_sha256())
    return {"shape": list(codebook.shape), "sha256": tokenizer.codebook_sha256()}


def export_codebook(tokenizer: Tokenizer, out: str | Path) -> Path:
    """A folder holding only the codebook files (and a small manifest)."""
    out = Path(out)
    tmp = _staging(out)
    facts = write_codebook(tokenizer, tmp)
    (tmp / "manifest.json").write_text(json.dumps({"codebook": facts}, indent=2))
    tmp.rename(out)
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
    log=None,
) -> dict:
    """Encode every example of a source once into token shards; returns the manifest.

    ``data``: a source spec, or a data section (``source``, ``val_fraction``, ...: a
    checkpoint's meta keeps the one it was trained on). ``workers`` decode in parallel
    (-1: as many as pay, as in training).
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data = {"source": data} if isinstance(data, str) else dict(data)
    source_spec = data["source"]
    out = Path(out).expanduser()
    source = data_lib.make_source(
        data,
        image_size=tokenizer.image_size,
        channels=tokenizer.channels,
        train=split == "train",
    )
    tmp = _staging(out)
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
            pending.append((tokenizer.encode(batch["image"]), batch["label"].astype(np.int32)))
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
            raise ValueError(f"source {source_spec} gave no images to export")
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
            "skipped_files": sorted(skipped),
            # relative to this folder, so the pair can move together (no machine path)
            "tokenizer": os.path.relpath(tokenizer.workdir, out) if tokenizer.workdir else "",
            "codebook": write_codebook(tokenizer, tmp),
            "shards": shards,
            "seconds": round(time.time() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
