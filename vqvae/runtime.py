"""Process set-up shared by the scripts: logging, the compilation cache, clean errors."""

import ast
import contextlib
import logging
import os
import sys

import jax

from vqvae.errors import UserError


def setup() -> None:
    """Readable logging, JAX's persistent compilation cache (model creation in ~1 s), and
    the filters that keep background writers' noise about a full disk off the screen."""
    from vqvae.checkpoint import quiet_background_errors

    quiet_background_errors()
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


@contextlib.contextmanager
def clean_errors(prog: str):
    """Known bad input ends the program with one line on stderr, not a traceback: the
    package's ``UserError`` (every value it refuses is one). Any other exception, a bare
    ``ValueError`` or ``TypeError`` included, is a bug and keeps its traceback."""
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. a config file that does not exist: its last line says which
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"{prog}: error: {lines[-1].strip()}", file=sys.stderr)
        sys.exit(2)
