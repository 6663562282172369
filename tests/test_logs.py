"""What a run leaves for people: readable PNG grids and TensorBoard's images and histograms."""

import json
import struct

import numpy as np
from PIL import Image

from tests.conftest import config
from vqvae.logs import GRID_BORDER_PX, MetricsLog, image_grid


def events(logdir):
    """Every summary value in a TensorBoard event folder: [(step, tag, value proto)]."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):  # TFRecord: length (u64), its crc, the record, its crc
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            out += [(event.step, v.tag, v) for v in event.summary.value]
    return out


def test_grid_enlarges_small_images_and_separates_the_tiles(tmp_path):
    rng = np.random.default_rng(0)
    top, bottom = (rng.integers(0, 200, (3, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    grid = image_grid([top, bottom], tmp_path / "g.png")
    png = np.asarray(Image.open(tmp_path / "g.png"))
    np.testing.assert_array_equal(png, grid)
    b, t = GRID_BORDER_PX, 96  # 16 px tiles enlarged 6x, by nearest neighbour
    assert b >= 1
    assert png.shape == (b + 2 * (t + b), b + 3 * (t + b), 3)
    assert (png[:b] == 255).all() and (png[:, b + t : 2 * b + t] == 255).all()  # borders
    tile = png[b : b + t, 2 * b + t : 2 * b + 2 * t]  # the top row's second image
    np.testing.assert_array_equal(tile, top[1].repeat(6, axis=0).repeat(6, axis=1))
    big = image_grid([top[:1].repeat(8, axis=1).repeat(8, axis=2)], tmp_path / "b.png")
    assert big.shape == (128 + 2 * b, 128 + 2 * b, 3)  # large images keep their size


def test_tensorboard_gets_the_learning_rate_the_grid_and_code_usage(tmp_path):
    from vqvae.trainer import Trainer

    cfg = config(steps=4, log_every=2, eval_every=4, checkpoint_every=4, tensorboard=True)
    Trainer(cfg, tmp_path).train()
    got = events(tmp_path / "tensorboard")
    tags = {tag for _, tag, _ in got}
    assert {"train/loss", "train/lr", "eval/mse", "eval/grid", "codes/usage"} <= tags, tags
    (grid,) = [v.image for step, tag, v in got if tag == "eval/grid" and step == 4]
    assert grid.height == np.asarray(Image.open(tmp_path / "eval_grid.png")).shape[0]
    (hist,) = [v.histo for step, tag, v in got if tag == "codes/usage" and step == 4]
    k = cfg.model.quantizer.num_codes
    assert len(hist.bucket) == k and hist.max == k - 1
    evaluated = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (examples,) = [r["examples"] for r in evaluated if r["split"] == "eval"]
    grid_cells = (cfg.model.image_size // 4) ** 2  # tiny: 4x downsampling
    assert hist.num == sum(hist.bucket) == grid_cells * examples


def test_tensorboard_histogram_bins_large_codebooks(tmp_path):
    log = MetricsLog(tmp_path, 0)
    counts = np.zeros((2, 1000))
    counts[0, 999] = 5
    counts[1, :10] = 1
    log.code_usage(3, counts, max_bins=100)
    log.close()
    got = {tag: v.histo for _, tag, v in events(tmp_path / "tensorboard")}
    assert set(got) == {"codes/usage_level0", "codes/usage_level1"}
    assert len(got["codes/usage_level0"].bucket) == 100
    assert got["codes/usage_level0"].bucket[-1] == 5 and got["codes/usage_level1"].bucket[0] == 10
