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
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
