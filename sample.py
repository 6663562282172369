"""Use a trained tokenizer or prior, without its config file (checkpoints carry it).

    # reconstruct held-out images: inputs (top rows) over reconstructions; prints MSE/PSNR
    python sample.py --workdir DIR --out recon.png [--source SPEC] [--num 16]
    # encode a whole source into token shards (+ manifest.json and the codebook)
    python sample.py --workdir DIR --mode tokens --source SPEC --out tokens/ [--split val]
    # the codebook alone, as codebook.npy and codebook.npz
    python sample.py --workdir DIR --mode codebook --out codebook/
    # sample token grids from a trained prior and decode them with its tokenizer
    python sample.py --workdir PRIOR_DIR --mode generate --num 64 --temperature 1.0 \\
        --top-k 0 --out samples.png
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
    from vqvae.logs import image_grid, psnr
    from vqvae.model import to_model_range, to_uint8

    model, meta = load_model(workdir, step)
    cfg = meta["model"]
    data = {**meta["data"], "source": source or meta["data"]["source"]}
    src = data_lib.make_source(
        data, image_size=cfg["image_size"], channels=cfg["channels"], train=False
    )
    examples = data_lib.local_examples(src, num)
    images = next(examples)["image"]  # (num, H, W, C) uint8, held out from training
    examples.close()
    num = len(images)
    recon = jax.jit(lambda x: to_uint8(model(to_model_range(x)).reconstruction))(images)
    recon = np.asarray(recon)
    mse = float(np.mean((recon.astype(np.float64) - images) ** 2) / 255.0**2)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    per_row = 8
    rows = []
    for i in range(0, num, per_row):
        rows += [images[i : i + per_row], recon[i : i + per_row]]
    if len(rows) > 2 and len(rows[-1]) < per_row:
        rows = rows[:-2]
    image_grid(rows, Path(out))
    return {"mse": mse, "psnr": psnr(mse), "images": num}


def export(workdir, mode, out, source, split, step) -> None:
    from vqvae.export import export_codebook, export_tokens
    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(workdir, step)
    if mode == "codebook":
        export_codebook(tok, out)
        print(f"wrote {out}: codebook {tok.vocab_size} x {tok.codebook.shape[1]}")
        return
    data = tok.meta["data"]  # the checkpoint's: its data source and held-out share
    m = export_tokens(tok, {**data, "source": source or data["source"]}, out, split=split)
    print(
        f"wrote {out}: {m['num_examples']} token grids {m['grid_shape']} in "
        f"{len(m['shards'])} shard(s), {m['num_examples'] / max(m['seconds'], 1e-9):,.0f} img/s"
    )


def generate(workdir, out, num, temperature, top_k, label, seed, step) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vqvae.checkpoint import load_model
    from vqvae.logs import image_grid
    from vqvae.prior import sample
    from vqvae.tokenizer import Tokenizer

    prior, meta = load_model(workdir, step, kind="prior")
    tok = Tokenizer.load(meta["tokenizer"])
    labels = jnp.full((num,), label, jnp.int32)
    if label >= prior.num_classes:
        raise ValueError(f"--label {label}: the prior knows {prior.num_classes} classes")
    graphdef, state = nnx.split(prior)
    draw = jax.jit(
        lambda state, key, labels: sample(
            nnx.merge(graphdef, state), key, labels, temperature=temperature, top_k=top_k
        )
    )
    tokens = np.asarray(draw(state, jax.random.key(seed), labels))
    images = tok.decode(tokens.reshape(num, *tok.grid_shape(), *tok.token_levels))
    per_row = min(8, num)
    rows = [images[i : i + per_row] for i in range(0, num - num % per_row, per_row)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, Path(out))
    print(f"wrote {out}: {len(rows) * per_row} samples of {tok.grid_shape()} tokens")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    p.add_argument("--mode", default="recon", choices=["recon", "tokens", "codebook", "generate"])
    p.add_argument("--out", default=None, help="PNG grid (recon, generate) or folder to write")
    p.add_argument("--source", default=None, help="data source (default: the training one)")
    p.add_argument("--split", default="train", choices=["train", "val"], help="tokens: split")
    p.add_argument("--num", type=int, default=16, help="how many images")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--temperature", type=float, default=1.0, help="generate: temperature")
    p.add_argument("--top-k", type=int, default=0, help="generate: keep the k best (0: all)")
    p.add_argument("--label", type=int, default=-1, help="generate: class (-1: none)")
    p.add_argument("--seed", type=int, default=0, help="generate: random seed")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error("--num must be at least 1")
    if args.temperature <= 0:
        p.error("--temperature must be positive")
    out = args.out or {"recon": "recon.png", "generate": "samples.png"}.get(args.mode)
    if out is None:
        p.error(f"--mode {args.mode} needs --out FOLDER")
    setup()
    with clean_errors("sample.py"):
        if args.mode in ("tokens", "codebook"):
            export(args.workdir, args.mode, out, args.source, args.split, args.step)
        elif args.mode == "generate":
            generate(
                args.workdir,
                out,
                args.num,
                args.temperature,
                args.top_k,
                args.label,
                args.seed,
                args.step,
            )
        else:
            r = reconstruct(args.workdir, out, args.source, args.num, args.step)
            print(f"wrote {out}: {r['images']} images, MSE {r['mse']:.5f}, PSNR {r['psnr']:.2f} dB")


if __name__ == "__main__":
    main(sys.argv[1:])
