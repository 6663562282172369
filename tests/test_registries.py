"""Adding a quantizer kind or a data source is one definition plus one registry line: both
are registered here, from the test file alone, and the tiny config trains with each."""

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vqvae.data import SOURCES, DataError, make_source
from vqvae.quantizers import (
    KINDS,
    Quantizer,
    QuantizerConfig,
    QuantizerOutput,
    health,
    level_counts,
)
from vqvae.quantizers.assign import nearest_codes
from vqvae.trainer import Trainer

from .conftest import config

ROOT = Path(__file__).resolve().parent.parent


class FixedCodebook(Quantizer):
    """A toy kind: nearest of ``num_codes`` fixed random codes, straight-through, with a
    commitment loss (nothing about the codes is learned)."""

    def __init__(self, num_codes: int, code_dim: int, beta: float, scale: float, *, rngs):
        self.code_dim, self.vocab_size, self.beta = code_dim, num_codes, beta
        key = rngs.params()
        self.table = nnx.Variable(scale * jax.random.normal(key, (num_codes, code_dim)))

    def __call__(self, z, *, train=False):
        self.check_input(z)
        z = z.astype(jnp.float32)
        flat = z.reshape(-1, self.code_dim)
        ids = nearest_codes(flat, self.table.get_value()).reshape(z.shape[:-1])
        q = self.lookup(ids)
        loss = self.beta * jnp.mean(jnp.square(z - jax.lax.stop_gradient(q)))
        metrics = health(level_counts(ids, 1, self.vocab_size))
        return QuantizerOutput(z + jax.lax.stop_gradient(q - z), ids, loss, metrics)

    def lookup(self, indices):
        self.check_ids(indices)
        return self.table.get_value()[indices]

    def codes(self):
        return self.table.get_value()


@dataclasses.dataclass(frozen=True)
class FixedConfig(QuantizerConfig):
    """The toy kind's config, with a setting no other kind has (``scale``)."""

    kind: ClassVar[str] = "fixed"
    example: ClassVar[dict] = {"num_codes": 8}
    num_codes: int = 16
    beta: float = 0.25
    scale: float = 1.0  # the fixed codes' standard deviation

    def build(self, code_dim, rngs):
        return FixedCodebook(self.num_codes, code_dim, self.beta, self.scale, rngs=rngs)

    @property
    def vocab_size(self) -> int:
        return self.num_codes


class Stripes:
    """A toy source: ``stripes:N`` is N images of horizontal stripes, a period per image."""

    parallel = False

    def __init__(self, n: int, image_size: int, channels: int):
        self.n, self.size, self.channels = n, image_size, channels

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index

    def decode(self, record, rng):
        rows = (np.arange(self.size) // (1 + record % 4)) % 2 * 255
        image = np.broadcast_to(rows[:, None, None], (self.size, self.size, self.channels))
        return {"image": image.astype(np.uint8), "label": np.int32(record % 4)}

    def name(self, index):
        return f"stripes {index}"


def stripes(rest, data, *, image_size, channels, **_):
    if not rest.isdigit():
        raise DataError(f"stripes needs a count: stripes:N, got {rest!r}")
    return Stripes(int(rest), image_size, channels)


def test_a_kind_registered_here_trains_and_tokenizes(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "fixed", FixedConfig)
    c = config(steps=2, eval_every=2, checkpoint_every=2)
    c.model.quantizer = FixedConfig(num_codes=8, scale=3.0).to_dict()
    Trainer(c, tmp_path).train()
    from vqvae.tokenizer import Tokenizer

    tok = Tokenizer.load(tmp_path)
    ids = tok.encode(np.zeros((2, 16, 16, 3), np.uint8))
    assert tok.kind == "fixed" and ids.dtype == np.int32 and int(ids.max()) < 8
    assert tok.config["quantizer"] == {"kind": "fixed", "num_codes": 8, "beta": 0.25, "scale": 3.0}
    assert 2.0 < float(np.std(tok.codebook)) < 4.0  # its own setting took effect


def test_a_source_registered_here_trains(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES, "stripes", stripes)
    source = make_source({"source": "stripes:12"}, image_size=16)
    assert len(source) == 12 and source.decode(source[1], None)["image"].shape == (16, 16, 3)
    with pytest.raises(DataError, match="stripes needs a count"):
        make_source({"source": "stripes:many"}, image_size=16)
    c = config(steps=2, eval_every=2, checkpoint_every=2)
    c.data.source = "stripes:40"
    metrics = Trainer(c, tmp_path).train()
    assert np.isfinite(metrics["mse"])


def test_an_unknown_source_names_the_known_ones():
    with pytest.raises(DataError, match="unknown data source 'imagenet'.*folder.*tfds"):
        make_source({"source": "imagenet"}, image_size=16)


def test_no_kind_dispatch_outside_the_registries():
    """Which kind a quantizer or source is never decides a branch outside its registry."""
    found = subprocess.run(
        ["grep", "-rn", "--include=*.py", "kind ==", "vqvae/quantizers", "vqvae/sources.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert found.stdout == "", found.stdout


def test_importing_the_package_changes_no_global_hook():
    code = (
        "import logging, sys, threading\n"
        "before = (sys.unraisablehook, threading.excepthook)\n"
        "import vqvae.checkpoint, vqvae.trainer, vqvae.tokenizer\n"
        "assert (sys.unraisablehook, threading.excepthook) == before, 'hook replaced'\n"
        "assert not logging.getLogger('absl').filters, 'absl filter added'\n"
        "from vqvae.runtime import setup\n"
        "setup()\n"
        "assert sys.unraisablehook is not before[0], 'scripts install theirs'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_import_graph_has_no_circles():
    """Every import between the package's modules, function-level ones included."""
    import ast

    modules = {}
    for f in (ROOT / "vqvae").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def owner(name):  # the module (or package) an imported name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in modules}
    for m, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {owner(n) for n in names if n.startswith("vqvae")} - {m, ""}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    circles = [c for m in sorted(graph) if (c := cycle_from(m))]
    assert not circles, circles[0]
    # and no arrow points up: the math, the nets and the data below the run (checkpoints,
    # tasks, trainer), the run below the tools that read its checkpoints
    low = ("errors", "signals", "ste", "quantizers", "nets", "model", "sources", "data",
           "tfds_stream", "sharding", "adversarial", "lpips", "metrics", "flops")  # fmt: skip
    run = ("checkpoint", "tasks", "trainer", "runtime")
    tools = ("tokenizer", "export", "evaluate", "convert", "report")

    def within(m, group):
        return any(m == f"vqvae.{g}" or m.startswith(f"vqvae.{g}.") for g in group)

    up = [
        (m, o)
        for m, outs in graph.items()
        for o in outs
        if (within(m, low) and within(o, run + tools))
        or (within(m, ("checkpoint",)) and within(o, ("model", "prior", "maskgit", "tasks")))
        or (within(m, run) and within(o, tools[1:]))
    ]
    assert not up, sorted(up)
    # the research tools are off every path but their own
    study = [(m, o) for m, outs in graph.items() for o in outs
             if within(o, ("study",)) and not within(m, ("study",))]  # fmt: skip
    assert not study, study


def test_a_bug_keeps_its_traceback_and_a_bad_setting_is_one_line(tmp_path, monkeypatch, capsys):
    from vqvae.runtime import clean_errors

    for error in (TypeError, ValueError):  # a bare ValueError is a bug too (not the package's)

        def broken(self, *args, error=error, **kwargs):
            raise error("a bug inside the trainer")

        monkeypatch.setattr(Trainer, "_loop", broken)
        with pytest.raises(error, match="a bug inside the trainer"), clean_errors("train.py"):
            Trainer(config(steps=1), tmp_path / error.__name__).train()
    c = config(steps=1)
    c.model.quantizer.kind = "nope"
    with pytest.raises(SystemExit) as stop, clean_errors("train.py"):
        Trainer(c, tmp_path / "bad").train()
    said = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(said) == 1, said
    assert said[0].startswith("train.py: error: quantizer kind must be one of"), said
