"""Use a trained tokenizer or prior, without its config file (checkpoints carry it).

examples:
  # reconstruct held-out images: inputs (top rows) over reconstructions; prints MSE/PSNR
  python sample.py --workdir workdir/default --out workdir/default/recon.png --num 32
  # score every image of a folder (not only its held-out share)
  python sample.py --workdir workdir/default --source folder:DIR --split all --num 256
  # encode a whole source into token shards (+ manifest.json and the codebook)
  python sample.py --workdir workdir/default --mode tokens --source sample_photos \\
      --out workdir/tokens/ [--split val] [--augment flip|tencrop]
  # the codebook alone, as codebook.npy and codebook.npz
  python sample.py --workdir workdir/default --mode codebook --out workdir/codebook/
  # sample token grids from a trained prior or masked generator, decode with its tokenizer
  python sample.py --workdir workdir/prior --mode generate --num 64 --temperature 1.0 \\
      --top-k 0 --out workdir/prior/samples.png
  # class 3 with classifier-free guidance; a masked generator in 8 steps
  python sample.py --workdir workdir/prior --mode generate --label 3 --cfg-scale 3.0
  python sample.py --workdir workdir/maskgit --mode generate --steps 8 --cfg-scale 2.0
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from vqvae.generate import add_sampling_flags, sampling_settings
from vqvae.runtime import clean_errors, setup

# grain's unread prefetched batches are freed at exit by the resource tracker, which warns
# about "leaked shared_memory objects" (google/grain#398); nothing stays leaked: keep it quiet
SHM_WARNING = "ignore:resource_tracker:UserWarning"
if SHM_WARNING not in sys.warnoptions:
    sys.warnoptions.append(SHM_WARNING)  # read by the tracker process, started later

GRID_MAX = 64  # images shown in a reconstruction grid (the figures may be over more)
SPLITS = {"val": "held-out ", "train": "training ", "all": ""}  # "over 16 of N ... images"
TINY_SET = 32  # figures over fewer images than this are noisy: said so


def recon_source(meta: dict, source: str | None, split: str):
    """The images to score: the checkpoint's held-out set (its ``data.val_source`` in full
    where training had one) or ``source``'s; with ``split`` train its training part, with
    all every image."""
    from vqvae import data as data_lib

    data = dict(meta["data"])
    if source:
        data["source"] = source
    elif split == "val":  # the held-out set the training evaluated on
        data["val_source"] = meta.get("config", {}).get("data", {}).get("val_source", "")
    if split == "all":
        data["val_source"] = data["source"]  # a source used in full (nothing held out)
    cfg = meta["model"]
    return data_lib.make_source(
        data, image_size=cfg["image_size"], channels=cfg["channels"], train=split == "train"
    ), data.get("val_source") or data["source"]


def reconstruct(
    workdir: str, out: str, source: str | None, num: int, step: int | None, split: str = "val"
) -> dict:
    """MSE and PSNR over ``num`` images of the split (0: all of them) and a grid of the
    first (inputs over reconstructions)."""
    import jax

    from vqvae import data as data_lib
    from vqvae.checkpoint import load_model
    from vqvae.logs import image_grid, psnr
    from vqvae.model import to_model_range, to_uint8

    model, meta = load_model(workdir, step)
    src, spec = recon_source(meta, source, split)
    total = len(src) if num == 0 else min(num, len(src))
    fn = jax.jit(lambda x: to_uint8(model(to_model_range(x)).reconstruction))
    squared, done, shown = 0.0, 0, None
    examples = data_lib.local_examples(src, min(total, GRID_MAX))
    try:
        for batch in examples:
            images = batch["image"][: total - done]  # (n, H, W, C) uint8
            recon = np.asarray(fn(images))
            squared += float(np.sum((recon.astype(np.float64) - images) ** 2))
            done += len(images)
            if shown is None:
                shown = images, recon
            if done >= total:
                break
    finally:
        examples.close()
    mse = squared / max(done * np.prod(images.shape[1:]), 1) / 255.0**2
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    per_row = 8
    rows = []
    for i in range(0, len(shown[0]), per_row):
        rows += [shown[0][i : i + per_row], shown[1][i : i + per_row]]
    if len(rows) > 2 and len(rows[-1]) < per_row:
        rows = rows[:-2]
    image_grid(rows, Path(out))
    return {
        "mse": mse,
        "psnr": psnr(mse),
        "images": done,
        "shown": sum(len(r) for r in rows[::2]),
        "of": f"{total} of {len(src):,} {SPLITS[split]}images of {spec}",
    }


def export(workdir, mode, out, source, split, step, augment="none") -> None:
    from vqvae.export import export_codebook, export_tokens
    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(workdir, step)
    if mode == "codebook":
        export_codebook(tok, out)
        print(f"wrote {out}: codebook {tok.vocab_size} x {tok.codebook.shape[1]}")
        return
    data = tok.meta["data"]  # the checkpoint's: its data source and held-out share
    spec = {**data, "source": source or data["source"]}
    m = export_tokens(tok, spec, out, split=split, augment=augment)
    each = f" x {len(m['views'])} views ({', '.join(m['views'])})" if augment != "none" else ""
    print(
        f"wrote {out}: {m['num_examples']}{each} token grids {m['grid_shape']} in "
        f"{len(m['shards'])} shard(s), {m['num_examples'] / max(m['seconds'], 1e-9):,.0f} img/s"
    )


def generate(workdir, out, num, label, seed, step, **settings) -> None:
    """Sample ``num`` grids from a prior or masked generator, decode them, write a grid.
    ``settings``: the sampler's (temperature, top_k, top_p, cfg_scale, cfg_schedule; the
    masked generator's also steps and choice_temperature)."""
    import time

    from vqvae.generate import Generator
    from vqvae.logs import image_grid

    gen = Generator(workdir, step, **settings)
    labels = gen.labels(num, label)
    gen.tokens(labels, seed)  # compiled before the clock starts
    t0 = time.perf_counter()
    tokens = gen.tokens(labels, seed)
    seconds = time.perf_counter() - t0
    images = gen.tokenizer.decode(tokens)
    per_row = num // gen.num_classes if label == "each" else min(8, num)
    rows = [images[i : i + per_row] for i in range(0, num - num % per_row, per_row)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, Path(out))
    print(
        f"wrote {out}: {len(rows) * per_row} samples of {gen.tokenizer.grid_shape()} tokens "
        f"from the {gen.kind}, {num / max(seconds, 1e-9):,.1f} samples/s (sampling, after "
        "compiling)"
    )


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block above them)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help shows each default (where the help does not say it) and keeps the examples'
    layout."""

    def _get_help_string(self, action):
        shown = action.default not in (None, argparse.SUPPRESS) and "default" not in action.help
        return f"{action.help} (default: %(default)s)" if shown else action.help


def make_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are checked against it)."""
    p = _Parser(prog="sample.py", description=__doc__, formatter_class=_Help)
    p.add_argument("--workdir", required=True, help="training workdir with checkpoints/")
    p.add_argument(
        "--mode",
        default="recon",
        choices=["recon", "tokens", "codebook", "generate"],
        help="reconstruct images, export tokens or the codebook, or sample from a prior",
    )
    p.add_argument(
        "--out",
        default=None,
        help="PNG grid (recon, generate; default WORKDIR/recon.png, WORKDIR/samples.png) or "
        "the folder to write (tokens, codebook: required, must not exist)",
    )
    p.add_argument("--source", default=None, help="data source (default: the training one)")
    p.add_argument(
        "--split",
        default=None,
        choices=["train", "val", "all"],
        help="which images: val (held out), train, or all (recon: every image of the source, "
        "nothing held out). Default: recon val, tokens train",
    )
    p.add_argument(
        "--augment",
        default="none",
        choices=["none", "flip", "tencrop"],
        help="tokens: also export each image's mirror image (flip), or its ten crops read "
        "1.1x larger (tencrop: centre, corners and their mirrors, as LlamaGen extracts)",
    )
    p.add_argument("--num", type=int, default=16, help="how many images (recon: 0 for all)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    add_sampling_flags(p, "generate")
    return p


def main(argv=None) -> None:
    p = make_parser()
    args = p.parse_args(argv)
    if args.num < (0 if args.mode == "recon" else 1):
        p.error(f"--num must be at least {0 if args.mode == 'recon' else 1}, got {args.num}")
    try:
        settings = sampling_settings(args)
    except ValueError as e:
        p.error(str(e))
    split = args.split or ("val" if args.mode == "recon" else "train")
    if args.mode == "tokens" and split == "all":
        p.error("--split all is for recon; tokens export train or val")
    default_out = {"recon": "recon.png", "generate": "samples.png"}.get(args.mode)
    out = args.out or (default_out and str(Path(args.workdir) / default_out))
    if out is None:
        p.error(f"--mode {args.mode} needs --out FOLDER")
    if args.mode in ("tokens", "codebook") and Path(out).expanduser().exists():
        p.error(f"--out {out} already exists; choose a new folder or remove it")  # before loading
    setup()
    with clean_errors("sample.py"):
        if args.mode in ("tokens", "codebook"):
            export(args.workdir, args.mode, out, args.source, split, args.step, args.augment)
        elif args.mode == "generate":
            generate(args.workdir, out, args.num, args.label, args.seed, args.step, **settings)
        else:
            r = reconstruct(args.workdir, out, args.source, args.num, args.step, split)
            print(
                f"wrote {out}: {r['shown']} images, MSE {r['mse']:.5f}, PSNR {r['psnr']:.2f} dB "
                f"over {r['of']}"
            )
            if r["images"] < TINY_SET:
                print(
                    f"note: only {r['images']} image(s) scored: figures over so few are noisy "
                    "(--split all scores every image of a source)",
                    file=sys.stderr,
                )


if __name__ == "__main__":
    main(sys.argv[1:])
