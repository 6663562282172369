"""Process set-up shared by the scripts: logging, the compilation cache, clean errors."""

import ast
import contextlib
import logging
import os
import signal
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
    # every program: checkpoint saves compile ~100 tiny slicing programs per fresh process
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


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
                msg = _unknown_key(e)
            print(f"{prog}: error: {msg} (see --help)", file=sys.stderr)
            sys.exit(2)

    return parse


def _unknown_key(e: Exception) -> str:
    """ml_collections' KeyError for an unknown override -> "unknown config key 'x' (...)"."""
    text = str(e.args[0] if e.args else e)
    if text[:1] in "'\"":  # absl passes the KeyError on as its repr
        with contextlib.suppress(ValueError, SyntaxError):
            text = ast.literal_eval(text)
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    key = lines[0].strip("'\"") if lines else "?"
    hint = next((x for x in lines[1:] if x.lower().startswith("did you mean")), "")
    hint = f" ({hint[0].lower()}{hint[1:].rstrip('?')}?)" if hint else ""
    return f"unknown config key '{key}'{hint}"


class StopRequest:
    """SIGTERM and SIGINT (Ctrl-C) recorded instead of raised, so a run stops where it is
    safe to: between steps (after saving) or between the steps of its start-up."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signal = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGTERM and SIGINT for the duration; the previous handlers come back."""
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def clean_errors(prog: str):
    """Known bad input ends the program with one line on stderr, not a traceback."""
    from vqvae.checkpoint import CheckpointError
    from vqvae.data import DataError
    from vqvae.lock import WorkdirBusy
    from vqvae.trainer import TrainingDiverged

    try:
        yield
    except (
        DataError,
        CheckpointError,
        TrainingDiverged,
        WorkdirBusy,
        ValueError,
        TypeError,
    ) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. a config file that does not exist: its last line says which
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"{prog}: error: {lines[-1].strip()}", file=sys.stderr)
        sys.exit(2)
