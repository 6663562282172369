"""Process set-up shared by the scripts: logging, the compilation cache, clean errors."""

import contextlib
import logging
import os
import sys

import jax


def setup() -> None:
    """Readable logging and JAX's persistent compilation cache (model creation in ~1 s)."""
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only folders
    cache = os.environ.get("VQVAE_JAX_CACHE", os.path.expanduser("~/.cache/vqvae/jax"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parse_flags(prog: str):
    """An absl flags parser that reports a bad flag or config key in one line."""
    from absl import flags

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            msg = lines[0]
            if isinstance(e, OSError):  # config file missing or broken: its last line says why
                msg = f"cannot load the config file: {lines[-1].strip()}"
            elif isinstance(e, AttributeError | KeyError):
                msg = f"unknown config key {msg.strip(chr(34))}"
            print(f"{prog}: error: {msg} (see --help)", file=sys.stderr)
            sys.exit(2)

    return parse


@contextlib.contextmanager
def clean_errors(prog: str):
    """Known bad input ends the program with one line on stderr, not a traceback."""
    from vqvae.checkpoint import CheckpointError
    from vqvae.data import DataError
    from vqvae.trainer import TrainingDiverged

    try:
        yield
    except (DataError, CheckpointError, TrainingDiverged, ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. a config file that does not exist: its last line says which
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"{prog}: error: {lines[-1].strip()}", file=sys.stderr)
        sys.exit(2)
