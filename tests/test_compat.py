"""A checkpoint written by an earlier release (tests/data/checkpoints/tiny_dfefb43: the
tiny config, 2 steps, written by commit dfefb43) still loads, tokenizes and resumes.

Regenerate one from a release with ``git worktree add /tmp/old REV`` and, there, the tiny
config trained for 2 steps (tensorboard off, workers 0, checkpoint and eval every 2).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vqvae.checkpoint import load_model
from vqvae.tokenizer import Tokenizer
from vqvae.trainer import Trainer

from .conftest import config, photos

OLD = Path(__file__).resolve().parent / "data" / "checkpoints" / "tiny_dfefb43"


@pytest.fixture
def old(tmp_path):
    shutil.copytree(OLD, tmp_path / "old")
    return tmp_path / "old"


def test_an_older_checkpoint_loads_and_tokenizes(old):
    meta = json.loads((old / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert "model_class" not in meta  # the older layout: only the kind names the model
    model, _ = load_model(old)
    tok = Tokenizer.load(old)
    images = photos(4)
    ids = tok.encode(images)
    assert ids.shape == (4, *tok.grid_shape(), *tok.token_levels) and ids.dtype == np.int32
    recon = tok.decode(ids)
    assert recon.shape == images.shape and recon.dtype == np.uint8


def test_an_older_checkpoint_resumes(old):
    c = config(steps=4, eval_every=2, checkpoint_every=2)
    Trainer(c, old).train()
    steps = sorted(int(p.name) for p in (old / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 4 and 2 in steps
    logged = [json.loads(x)["step"] for x in (old / "metrics.jsonl").read_text().splitlines()]
    assert min(logged) <= 2 < max(logged) == 4  # the old run's records kept, the new added
