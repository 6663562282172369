"""Reconstruct held-out images with a trained tokenizer, without its config file.

    python sample.py --workdir DIR --out recon.png [--source SPEC] [--num 16]

Reads the latest checkpoint (the model config and data source are stored in it), writes a
grid of inputs (top) over reconstructions (bottom) and prints MSE and PSNR.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from vqvae.runtime import clean_errors, setup


def reconstruct(workdir: str, out: str, source: str | None, num: int, step: int | None) -> dict:
    import jax

    from vqvae import data as data_lib
    from vqvae.checkpoint import load_model
    from vqvae.trainer import image_grid, to_model_range, to_uint8

    model, meta = load_model(workdir, step)
    cfg = meta["model"]
    src = data_lib.make_source(
        source or meta["data"]["source"],
        image_size=cfg["image_size"],
        channels=cfg["channels"],
        train=False,
        seed=meta["data"]["seed"],
        val_fraction=meta["data"]["val_fraction"],
    )
    images = src.batch(0, num)["image"]  # (num, H, W, C) uint8, held out from training
    recon = jax.jit(lambda x: to_uint8(model(to_model_range(x)).reconstruction))(images)
    recon = np.asarray(recon)
    mse = float(np.mean((recon.astype(np.float64) - images) ** 2) / 255.0**2)
    psnr = float(10 * np.log10(1.0 / max(mse, 1e-12)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    per_row = 8
    rows = []
    for i in range(0, num, per_row):
        rows += [images[i : i + per_row], recon[i : i + per_row]]
    if len(rows) > 2 and len(rows[-1]) < per_row:
        rows = rows[:-2]
    image_grid(rows, Path(out))
    return {"mse": mse, "psnr": psnr, "images": num}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    p.add_argument("--out", default="recon.png", help="PNG grid to write")
    p.add_argument("--source", default=None, help="data source (default: the training one)")
    p.add_argument("--num", type=int, default=16, help="how many held-out images")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be at least 1")
    setup()
    with clean_errors("sample.py"):
        r = reconstruct(args.workdir, args.out, args.source, args.num, args.step)
    print(f"wrote {args.out}: {r['images']} images, MSE {r['mse']:.5f}, PSNR {r['psnr']:.2f} dB")


if __name__ == "__main__":
    main(sys.argv[1:])
