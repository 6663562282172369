"""Eight fake CPU devices for sharding tests; set before anything imports jax.

A compilation cache inside the checkout lets the many small trainers (and the scripts run
as subprocesses) share compiled programs instead of compiling each again.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = str(Path(__file__).resolve().parent.parent / ".cache" / "jax-tests")
os.environ.setdefault("VQVAE_JAX_CACHE", _CACHE)  # read by vqvae.runtime.setup()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402  (after the environment above)


def config(**overrides):
    """The tiny config without TensorBoard or decoding workers, with dotted-key overrides."""
    from configs import tiny

    c = tiny.get_config()
    c.tensorboard = False
    c.data.workers = 0  # worker processes only where a test asks for them
    return override(c, **overrides)


def override(c, **overrides):
    """Set dotted keys ("gan.start_step") of a config; returns it."""
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="session")
def trained10(tmp_path_factory):
    """A tiny tokenizer workdir trained for 10 steps (checkpoint 10); copy it to change it."""
    from vqvae.trainer import Trainer

    workdir = tmp_path_factory.mktemp("trained10")
    Trainer(config(steps=10), workdir).train()
    return workdir


def photos(n: int, size: int = 16, train: bool = False):
    """n held-out sample photo tiles, uint8 (n, size, size, 3), in a fixed order."""
    from vqvae.data import local_examples, make_source

    source = make_source({"source": "sample_photos"}, image_size=size, train=train)
    examples = local_examples(source, n)
    try:
        return next(examples)["image"]
    finally:
        examples.close()
