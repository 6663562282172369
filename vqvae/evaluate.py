"""Score a tokenizer (or any image pairs) as the field does: rFID, PSNR, SSIM, LPIPS, usage.

    python -m vqvae.evaluate --workdir W [--step N] [--source SPEC] [--num N]
        [--protocol pytorch-fid|torch-fidelity] [--resize torch|tf1] [--no-round]
        [--inception FILE] [--lpips FILE] [--reference-stats FILE] [--out results.json]
    python -m vqvae.evaluate --pairs DIR_A DIR_B [same metric options]
    python -m vqvae.evaluate --generator G --num N [--cfg-scale S ...] --inception FILE

With ``--workdir`` every held-out image of the checkpoint's source (its own split by
default, or ``--source``) is encoded and decoded; with ``--pairs`` the PNGs of DIR_A
(originals) are scored against the files of the same relative names in DIR_B; with
``--generator`` (a prior's or masked generator's workdir) N samples, every class in turn
(or ``--label``), are scored by FID against its tokenizer's held-out set (or
``--reference-stats``), beside the checkpoint's held-out bits per token. PSNR and
SSIM always run (scikit-image's, on uint8); rFID needs ``--inception`` (the FID Inception
weights, ``python -m vqvae.metrics.inception``), LPIPS ``--lpips`` (VGG16 or AlexNet).
The record (``--out``, JSON) names the checkpoint, step, source, image count, protocol and
every setting that moves a number; a table goes to stdout.
"""

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vqvae.errors import InvalidValueError
from vqvae.metrics.accumulator import ReconstructionMetrics
from vqvae.metrics.fid import PROTOCOLS, FeatureExtractor, FIDMetric, protocol, sha256
from vqvae.metrics.inception import FEATURE_DIM


class EvaluateError(ValueError):
    """Bad arguments or inputs: one line for the user."""


# --- codebook usage ------------------------------------------------------------------------
def usage_figures(counts: np.ndarray) -> dict:
    """Usage (fraction of ids seen), entropy (bits) and perplexity (2**entropy) of counts."""
    total = counts.sum()
    p = counts[counts > 0] / total
    entropy = float(-(p * np.log2(p)).sum())
    return {
        "usage": float((counts > 0).mean()),
        "used": int((counts > 0).sum()),
        "entropy_bits": entropy,
        "perplexity": float(2.0**entropy),
    }


class CodeUsage:
    """Code counts over every token of the set: per level and, with levels, joint."""

    def __init__(self, vocab: int, levels: int):
        self.vocab, self.levels = vocab, levels
        self.counts = np.zeros((levels, vocab), np.int64)
        self.joint: dict[tuple, int] = {}

    def update(self, tokens: np.ndarray) -> None:
        t = np.asarray(tokens).reshape(-1, self.levels)
        for level in range(self.levels):
            self.counts[level] += np.bincount(t[:, level], minlength=self.vocab)
        if self.levels > 1:
            rows, n = np.unique(t, axis=0, return_counts=True)
            for r, c in zip(map(tuple, rows), n, strict=True):
                self.joint[r] = self.joint.get(r, 0) + int(c)

    def result(self) -> dict:
        if self.levels == 1:
            return {"codebook": {"vocab_size": self.vocab, **usage_figures(self.counts[0])}}
        joint = np.array(list(self.joint.values()), np.float64)
        p = joint / joint.sum()
        entropy = float(-(p * np.log2(p)).sum())
        return {
            "codebook": {
                "vocab_size": self.vocab,
                "levels": self.levels,
                "joint": {
                    "distinct": len(self.joint),
                    "entropy_bits": entropy,
                    "perplexity": float(2.0**entropy),
                },
                "per_level": [usage_figures(c) for c in self.counts],
            }
        }


# --- the inputs ----------------------------------------------------------------------------
def _pngs(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise EvaluateError(f"--pairs: {folder} is not a folder")
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*.png"))}


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def pair_batches(dir_a: str, dir_b: str, batch: int, num: int | None):
    """(originals, reconstructions) uint8 batches of the PNGs both folders hold by name."""
    a, b = _pngs(Path(dir_a)), _pngs(Path(dir_b))
    if not a:
        raise EvaluateError(f"--pairs: no .png files under {dir_a}")
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise EvaluateError(
            f"--pairs: the folders hold different files ({len(only)} unmatched, e.g. {only[0]})"
        )
    names = sorted(a)[:num] if num else sorted(a)
    for i in range(0, len(names), batch):
        xs, ys = [], []
        for n in names[i : i + batch]:
            x, y = _read_png(a[n]), _read_png(b[n])
            if x.shape != y.shape:
                raise EvaluateError(f"--pairs: {n} is {x.shape[:2]} in A and {y.shape[:2]} in B")
            if xs and x.shape != xs[0].shape:
                raise EvaluateError(
                    f"--pairs: {n} is {x.shape[:2]}, others {xs[0].shape[:2]}; "
                    "resize the images to one size first"
                )
            xs.append(x)
            ys.append(y)
        yield np.stack(xs), np.stack(ys), None
    return len(names)


def checkpoint_batches(tok, model, source, batch: int, num: int | None):
    """(originals uint8, reconstructions float32 on 0..255 (clipped), tokens) for the
    held-out set; rounding them gives exactly ``Tokenizer.decode``'s uint8."""
    from flax import nnx

    from vqvae.data import local_examples

    graphdef, state = nnx.split(model)
    decode = jax.jit(
        lambda s, t: jnp.clip((nnx.merge(graphdef, s).decode_indices(t) + 0.5) * 255.0, 0, 255)
    )
    seen = 0
    examples = local_examples(source, batch)
    try:
        for host in examples:
            x = host["image"]
            if num is not None:
                x = x[: max(num - seen, 0)]
            if len(x) == 0:
                break
            tokens = tok.encode(x)
            recon = np.asarray(decode(state, jnp.asarray(tokens)), np.float32)
            seen += len(x)
            yield x, recon, tokens
            if num is not None and seen >= num:
                break
    finally:
        examples.close()


# --- the run -------------------------------------------------------------------------------
def _weights_or_reason(path, metric: str, load):
    """(loaded object, None) or (None, why the metric is skipped)."""
    if not path:
        flag = "--inception" if metric == "rfid" else "--lpips"
        return None, f"no {flag} weights file given"
    try:
        return load(path), None
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise EvaluateError(f"{e} (PSNR, SSIM and codebook usage run without it)") from None


def evaluate(
    batches,
    proto,
    *,
    inception: str | None = None,
    lpips: str | None = None,
    reference_stats: str | None = None,
    usage: CodeUsage | None = None,
    total: int | None = None,
    progress: bool = True,
) -> dict:
    """Score (originals, reconstructions, tokens) batches; the metrics and skip reasons."""
    from tqdm import tqdm

    from vqvae.metrics import perceptual
    from vqvae.metrics.stats import read_stats

    skipped = {}
    fid = reference = None
    try:  # read first: a bad file fails before any weights load (pytorch-fid's files and
        # ADM reference batches both hold the pool mu, sigma)
        reference = read_stats(reference_stats) if reference_stats else None
        if reference is not None and reference.mu.shape != (FEATURE_DIM,):
            raise InvalidValueError(
                f"{reference_stats} holds {reference.mu.shape[0]}-d statistics; the FID "
                f"Inception's pool features are {FEATURE_DIM}-d"
            )
        if reference is not None and proto.frechet == "gram":
            raise InvalidValueError(
                "frechet 'gram' needs both feature sets, not a reference stats file"
            )
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise EvaluateError(f"--reference-stats: {e}") from None
    extractor, why = _weights_or_reason(
        inception, "rfid", lambda p: FeatureExtractor.from_file(p, proto)
    )
    if extractor is None:
        skipped["rfid"] = why
    else:
        fid = FIDMetric(extractor, reference)
    lp, why = _weights_or_reason(lpips, "lpips", perceptual.load)
    lpm = None
    if lp is None:
        skipped["lpips"] = why
    else:
        lpm = perceptual.LPIPSMetric(*lp)
    rec = ReconstructionMetrics()
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr)
    for originals, recon, tokens in batches:
        recon_u8 = recon if recon.dtype == np.uint8 else np.round(recon).astype(np.uint8)
        rec.update(originals, recon_u8)
        scored = recon_u8 if proto.round_uint8 else recon.astype(np.float32)
        if fid is not None:
            fid.update(originals, scored)
        if lpm is not None:
            try:
                lpm.update(originals, scored)
            except ValueError as e:  # images too small for the backbone
                raise EvaluateError(str(e)) from None
        if usage is not None and tokens is not None:
            usage.update(tokens)
        bar.update(len(originals))
    bar.close()
    seconds = time.perf_counter() - start
    if rec.count == 0:
        raise EvaluateError("no images to score")
    out = rec.result()
    metrics = {"psnr": out["psnr"], "ssim": out["ssim"], "identical_pairs": out["identical"]}
    metrics["rfid"] = fid.result()["rfid"] if fid is not None else None
    if lpm is not None:
        metrics.update(lpm.result())
    else:
        metrics.update({"lpips": None, "lpips_backbone": None})
    if usage is not None:
        metrics.update(usage.result())
    return {
        "images": rec.count,
        "metrics": metrics,
        "skipped": skipped,
        "seconds": seconds,
        "images_per_second": rec.count / seconds if seconds > 0 else None,
        "weights": {
            "inception": None if extractor is None else str(Path(inception).resolve()),
            "inception_sha256": None if extractor is None else sha256(inception),
            "lpips": None if lpm is None else str(Path(lpips).resolve()),
            "lpips_sha256": None if lpm is None else sha256(lpips),
            "reference_stats": str(Path(reference_stats).resolve()) if reference_stats else None,
        },
    }


def table(record: dict) -> str:
    """The record's figures as a small text table."""
    m = record["metrics"]
    if record.get("mode") == "generate":
        fid = "skipped: " + record["skipped"]["fid"] if m["fid"] is None else f"{m['fid']:.4f}"
        lines = [
            f"{record['generator']}  step {record['step']}  {record['images']} samples "
            f"({record['kind']}, labels: {record['labels']})  "
            f"protocol {record['protocol']['name']}",
            f"  {'FID':<32} {fid}",
        ]
        for k, v in (m["held_out"] or {}).items():
            lines.append(f"  {'held-out ' + k:<32} {v}")
        return "\n".join(lines)
    rows = [
        ("rFID", m["rfid"]),
        ("PSNR (dB)", m["psnr"]),
        ("SSIM", m["ssim"]),
        (f"LPIPS ({m['lpips_backbone']})" if m["lpips"] is not None else "LPIPS", m["lpips"]),
    ]
    cb = m.get("codebook")
    if cb and "joint" in cb:
        rows.append(("joint perplexity", cb["joint"]["perplexity"]))
        for k, lv in enumerate(cb["per_level"]):
            rows.append(
                (f"level {k} usage / perplexity", f"{lv['usage']:.4f} / {lv['perplexity']:.2f}")
            )
    elif cb:
        rows.append(("codebook usage", cb["usage"]))
        rows.append(("perplexity", cb["perplexity"]))
    rows.append(("images/s", record["images_per_second"]))
    lines = [
        f"{record.get('checkpoint') or record.get('pairs')}  step {record.get('step')}  "
        f"{record['images']} images  protocol {record['protocol']['name']}"
    ]
    for name, v in rows:
        if v is None:
            text = "skipped: " + record["skipped"].get(name.split()[0].lower(), "no weights")
        elif isinstance(v, float):
            text = "inf" if math.isinf(v) else f"{v:.4f}"
        else:
            text = str(v)
        lines.append(f"  {name:<32} {text}")
    return "\n".join(lines)


def _versions() -> dict:
    import flax

    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__}


def run(args) -> dict:
    """The command's work: the JSON record (also written to ``args.out`` when given)."""
    proto = protocol(
        args.protocol,
        resize=args.resize,
        round_uint8=False if args.no_round else None,
        size=args.fid_size,
        frechet=args.frechet,
    )
    common = {
        "inception": args.inception,
        "lpips": args.lpips,
        "reference_stats": args.reference_stats,
        "progress": not args.quiet,
    }
    if sum(bool(x) for x in (args.pairs, args.workdir, args.generator)) > 1:
        raise EvaluateError("give one of --workdir, --pairs and --generator")
    if args.generator:
        result, head = generation(args, proto)
    elif args.pairs:
        batches = pair_batches(*args.pairs, args.batch_size, args.num)
        n = len(_pngs(Path(args.pairs[0])))
        result = evaluate(batches, proto, total=min(n, args.num or n), **common)
        head = {"mode": "pairs", "pairs": [str(Path(d).resolve()) for d in args.pairs]}
        head |= {"checkpoint": None, "step": None, "source": None, "split": None}
    else:
        if not args.workdir:
            raise EvaluateError(
                "give --workdir W (a trained tokenizer), --pairs DIR_A DIR_B or --generator G"
            )
        from vqvae.checkpoint import load_model
        from vqvae.sources import make_source
        from vqvae.tokenizer import Tokenizer, _resolve

        workdir, found = _resolve(args.workdir)
        if not workdir.is_dir():
            raise EvaluateError(f"no tokenizer at {args.workdir}: {workdir} does not exist")
        # an explicit step, so the record names the checkpoint the figures are from
        step = args.step if args.step is not None else found
        step = step if step is not None else _latest_step(workdir)
        if step is None:
            raise EvaluateError(f"no checkpoints in {workdir / 'checkpoints'}")
        model, meta = load_model(workdir, step)
        tok = Tokenizer(model, meta, workdir.resolve())
        data = dict(meta.get("data", {}))
        if args.source:
            data["source"] = args.source
        source = make_source(data, image_size=tok.image_size, channels=tok.channels, train=False)
        usage = CodeUsage(tok.vocab_size, tok.num_levels)
        total = min(len(source), args.num or len(source))
        batches = checkpoint_batches(tok, model, source, args.batch_size, args.num)
        result = evaluate(batches, proto, usage=usage, total=total, **common)
        head = {
            "mode": "checkpoint",
            "pairs": None,
            "checkpoint": str(workdir.resolve()),
            "step": int(step),
            "source": data.get("source"),
            "split": "held-out (val_fraction {})".format(data.get("val_fraction")),
            "quantizer": tok.kind,
            "image_size": tok.image_size,
        }
    record = {
        "tool": "vqvae.evaluate",
        **head,
        "images": result["images"],
        "protocol": proto.to_dict(),
        **{k: v for k, v in result.items() if k != "images"},
        "batch_size": args.batch_size,
        "devices": [str(d) for d in jax.local_devices()],
        "versions": _versions(),
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
        tmp.replace(out)
    return record


def generation(args, proto) -> tuple[dict, dict]:
    """(result, head) of ``--generator``: FID of ``args.num`` samples against the
    tokenizer's held-out images (or ``--reference-stats``), and the checkpoint's own
    held-out bits per token (the NLL, which needs no Inception)."""
    from tqdm import tqdm

    from vqvae.data import local_examples
    from vqvae.generate import Generator, sampling_settings
    from vqvae.sources import make_source

    try:
        gen = Generator(args.generator, args.step, **sampling_settings(args))
        labels = gen.labels(max(args.num or 1, 1), args.label)  # a bad label: one line, first
    except ValueError as e:
        raise EvaluateError(str(e)) from None
    tok = gen.tokenizer
    data = dict(tok.meta.get("data", {}))
    if args.source:
        data["source"] = args.source
    reals = None
    if not args.reference_stats:
        reals = make_source(data, image_size=tok.image_size, channels=tok.channels, train=False)
    num = args.num or (len(reals) if reals is not None else 0)
    if num < 1:
        raise EvaluateError("give --num N: how many samples to score against the stats file")
    labels = gen.labels(num, args.label)
    step = args.step if args.step is not None else _latest_step(Path(args.generator))
    evaluation = gen.meta.get("eval") or _eval_record(Path(args.generator), step) or {}
    held_out = {k: v for k, v in evaluation.items() if "bits" in k or k == "examples"}
    metrics = {"fid": None, "held_out": held_out or None}
    skipped, fid, extractor, seen = {}, None, None, 0
    if args.inception:
        from vqvae.metrics.stats import read_stats

        reference = read_stats(args.reference_stats) if args.reference_stats else None
        extractor, _ = _weights_or_reason(
            args.inception, "rfid", lambda p: FeatureExtractor.from_file(p, proto)
        )
        fid = FIDMetric(extractor, reference)
    else:
        skipped["fid"] = "no --inception weights file given (the held-out NLL needs none)"
    start = time.perf_counter()
    real_batches = local_examples(reals, args.batch_size) if reals is not None else None
    bar = tqdm(total=num, unit="img", disable=args.quiet, file=sys.stderr)
    try:
        for fakes in gen.images(labels, args.seed, args.batch_size):
            originals = None
            if real_batches is not None:
                originals = next(real_batches, {"image": fakes[:0]})["image"]
                originals = originals[: max(num - seen, 0)]
            if fid is not None:
                if originals is not None and len(originals) and fid.reference is None:
                    fid.add(originals, real=True)
                fid.add(fakes, real=False)
            seen += len(fakes)
            bar.update(len(fakes))
    finally:
        bar.close()
        if real_batches is not None:
            real_batches.close()
    seconds = time.perf_counter() - start
    if fid is not None:
        metrics["fid"] = fid.result()["rfid"]
    result = {
        "images": num,
        "metrics": metrics,
        "skipped": skipped,
        "seconds": seconds,
        "images_per_second": num / seconds if seconds > 0 else None,
        "weights": {
            "inception": str(Path(args.inception).resolve()) if args.inception else None,
            "inception_sha256": sha256(args.inception) if args.inception else None,
            "reference_stats": (
                str(Path(args.reference_stats).resolve()) if args.reference_stats else None
            ),  # fmt: skip
        },
    }
    head = {
        "mode": "generate",
        "generator": str(Path(args.generator).resolve()),
        "kind": gen.kind,
        "step": step,
        "tokenizer": str(tok.workdir) if tok.workdir else None,
        "source": None if args.reference_stats else data.get("source"),
        "split": None
        if args.reference_stats
        else "held-out (val_fraction {})".format(data.get("val_fraction")),  # fmt: skip
        "labels": "every class in turn" if args.label == "all" and gen.num_classes else args.label,
        "seed": args.seed,
        "sampling": gen.settings,
        "checkpoint": None,
        "pairs": None,
    }
    return result, head


def _eval_record(workdir: Path, step: int | None) -> dict | None:
    """The held-out evaluation of ``step`` in the workdir's metrics.jsonl, if it has one."""
    path = workdir / "metrics.jsonl"
    found = None
    for line in path.read_text().splitlines() if path.is_file() and step is not None else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (record.get("split"), record.get("step")) == ("eval", step):
            found = record
    return found


def _latest_step(workdir: Path) -> int | None:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps) if steps else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vqvae.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="a training workdir (or its checkpoints/STEP folder)")
    p.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
    p.add_argument("--source", help="data source spec instead of the checkpoint's own")
    p.add_argument("--pairs", nargs=2, metavar=("DIR_A", "DIR_B"), help="score PNG pairs")
    p.add_argument("--num", type=int, help="score only the first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--protocol", default="pytorch-fid", choices=sorted(PROTOCOLS))
    p.add_argument("--resize", choices=("torch", "tf1"), help="override the protocol's resize")
    p.add_argument("--fid-size", type=int, help="override the resize target (299)")
    p.add_argument(
        "--no-round", action="store_true", help="FID/LPIPS on float reconstructions, not uint8"
    )
    p.add_argument(
        "--frechet",
        choices=("sqrtm", "eigh", "gram"),
        help="override the protocol's matrix root (gram: exact from the features, for N < 2048)",
    )
    p.add_argument("--inception", help="FID Inception weights (.npz; enables rFID)")
    p.add_argument("--lpips", help="LPIPS weights (.npz, VGG16 or AlexNet; enables LPIPS)")
    p.add_argument("--reference-stats", help="pytorch-fid or ADM .npz: FID against it instead")
    p.add_argument("--out", help="write the JSON record here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--generator", help="a prior's or masked generator's workdir: sample FID")
    from vqvae.generate import add_sampling_flags

    add_sampling_flags(p, "--generator")
    p.set_defaults(label="all")  # a generation FID over every class
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.num is not None and args.num < 1:
        sys.exit("python -m vqvae.evaluate: error: --num must be at least 1")
    if args.batch_size < 1:
        sys.exit("python -m vqvae.evaluate: error: --batch-size must be at least 1")
    from vqvae.checkpoint import CheckpointError
    from vqvae.sources import DataError

    try:
        record = run(args)
    except (EvaluateError, CheckpointError, DataError) as e:
        sys.exit(f"python -m vqvae.evaluate: error: {e}")
    print(table(record))


if __name__ == "__main__":
    main()
