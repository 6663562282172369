"""The input pipeline's throughput: one case per run, printed as JSON on the last line.

    python benchmarks/loader.py --workers N [--quick]   # N = -1: the old decoding path

Times the folder source at 256 px on ImageNet-like JPEGs (500 x 375, cut from the bundled
photos and made once per machine) from the iterator's creation, worker start-up and the
first fills included, and after its first batch (steady). ``benchmarks/run.py`` runs each
case in a fresh process. This script keeps its imports light at the top: the pipeline's
worker processes import it again when they start.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {False: 3000, True: 160}  # per case: full run, --quick


def jpeg_folder(n: int) -> Path:
    """n ImageNet-like JPEGs (500 x 375, quality 90) cut from the bundled photos; made once
    per machine in the temporary folder."""
    from PIL import Image

    from vqvae.sources import _photo_list

    root = Path(tempfile.gettempdir()) / f"vqvae-bench-jpegs-{n}"
    if (root / "done").is_file():
        return root
    root.mkdir(exist_ok=True)
    photos = [Image.fromarray(a) for _, a in _photo_list()]
    rng = np.random.default_rng(0)
    for i in range(n):
        im = photos[i % len(photos)]
        scale = rng.uniform(0.6, 1.0)  # a random crop of 60-100% of the short side
        side = int(min(im.size) * scale)
        left = rng.integers(0, im.width - side + 1)
        top = rng.integers(0, im.height - side + 1)
        box = (left, top, left + side, top + int(side * 0.75))
        im.crop(box).resize((500, 375), Image.BICUBIC).save(root / f"{i:05d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def old_decode(path, size: int, rng) -> np.ndarray:
    """The folder source's decoding before the grain pipeline: the whole image resized
    (short side to ``size``, bicubic), then a random crop; one image at a time."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        k = size / min(w, h)
        im = im.resize((max(size, round(w * k)), max(size, round(h * k))), Image.BICUBIC)
        arr = np.asarray(im)
    top = rng.integers(0, arr.shape[0] - size + 1)
    left = rng.integers(0, arr.shape[1] - size + 1)
    return arr[top : top + size, left : left + size]


def measure(workers: int, quick: bool, size: int = 256, batch: int = 32) -> dict:
    """Images/s of the folder source; ``workers`` -1: the old single-threaded path."""
    from vqvae.data import THREADS_PER_WORKER, TrainBatches, make_source  # before the clock

    n = IMAGES[quick]
    root = jpeg_folder(n)
    steps = n // batch
    t0 = t1 = time.perf_counter()
    if workers < 0:
        files = sorted(root.glob("*.jpg"))
        rng = np.random.default_rng(0)
        for step in range(steps):
            order = rng.permutation(len(files))[:batch]
            np.stack([old_decode(files[i], size, rng) for i in order])
            t1 = t1 if step else time.perf_counter()
        label, used = "old single-threaded folder source", 1
    else:
        data = {"source": f"folder:{root}", "val_fraction": 0.0, "workers": workers}
        source = make_source(data, image_size=size)
        with TrainBatches(source, data, batch, 0, None, 0) as batches:
            for step in range(steps):
                batches.next_host()
                t1 = t1 if step else time.perf_counter()
        # the cores it can keep busy: a worker's reading threads decode in parallel too
        # (Pillow releases the GIL), inline decoding is one thread
        cores = len(os.sched_getaffinity(0))
        used = min(cores, workers * THREADS_PER_WORKER) if workers else 1
        label = f"grain, {workers} worker(s)"
    secs = time.perf_counter() - t0
    rate = steps * batch / secs
    return {
        "case": f"loader {label}",
        "images": steps * batch,
        "seconds": secs,
        "first_batch_s": t1 - t0,
        "images_per_s": rate,
        "steady_images_per_s": (steps - 1) * batch / (t0 + secs - t1),
        "cores": used,
        "images_per_s_per_core": rate / used,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, required=True, help="-1: the old decoding path")
    p.add_argument("--quick", action="store_true", help="a few batches: a smoke run")
    args = p.parse_args(argv)
    print(json.dumps(measure(args.workers, args.quick)))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
