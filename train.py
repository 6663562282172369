"""Train a VQ-VAE tokenizer.

    python train.py --config configs/default.py --workdir workdir/default [--config.key=value]

Running it again with the same workdir resumes from the latest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint and exits. ``config.task`` says what is trained: the tokenizer
(default) or a prior over its tokens. Across processes (one per host, say):

    python train.py ... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

(or under Slurm / Open MPI, or with ``--config.distributed=True``, without the flags).
"""

import os
import signal
import sys

from vqvae.errors import InvalidValueError


def _stopped_early(signum, _frame):
    """SIGINT or SIGTERM before the run has started (the imports take a second or two):
    nothing is written yet, so say so in one line and leave at once. Exiting from here
    rather than raising keeps an import that is half done from printing a traceback."""
    name = signal.Signals(signum).name
    os.write(2, f"train.py: interrupted by {name} during start-up: nothing written\n".encode())
    os._exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM):  # first, before the heavy imports
    signal.signal(_sig, _stopped_early)

import difflib  # noqa: E402  (the handlers above go first)
import importlib.util  # noqa: E402
import logging  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vqvae.runtime import clean_errors, parse_flags, setup  # noqa: E402
from vqvae.signals import StopRequest  # noqa: E402

# grain leaves its workers' unread prefetched batches in shared memory when a pipeline
# closes; at exit the resource tracker frees them and warns "There appear to be N leaked
# shared_memory objects to clean up at shutdown" (google/grain#398). Nothing stays leaked,
# so the tracker process (started later, with these options) is told to keep quiet.
SHM_WARNING = "ignore:resource_tracker:UserWarning"
if SHM_WARNING not in sys.warnoptions:
    sys.warnoptions.append(SHM_WARNING)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and images.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0 (every process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's id.")
_LIST_CONFIG = flags.DEFINE_boolean(
    "list_config", False, "Print every config key with its value, then exit (or --list-config)."
)
flags.mark_flags_as_required(["config"])

HELP_FLAGS = ("-h", "-?", "-help", "--help", "--helpshort", "--helpfull")
CONFIG_HELP = """
config keys: every value of the config file is a flag of its own, --config.KEY=VALUE, dotted
for nested keys (--config.steps=5000 --config.model.quantizer.num_codes=1024). All of them,
with their values after any overrides:

    python train.py --config configs/default.py --list-config
"""


def _config_keys(config, prefix: str = "") -> dict:
    """Every key of a ConfigDict, dotted, with its value (nested sections and their keys)."""
    keys = {}
    for k, v in config.items():
        keys[prefix + k] = v
        if hasattr(v, "items"):
            keys.update(_config_keys(v, f"{prefix}{k}."))
    return keys


def _nearest_key(key: str, known: list[str]) -> str | None:
    """The known dotted key most like ``key``, at any depth: the same last name elsewhere
    (model.num_codes -> model.quantizer.num_codes), else the closest spelling."""
    leaf = key.rsplit(".", 1)[-1]
    same = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same:
        return max(same, key=lambda k: difflib.SequenceMatcher(None, key, k).ratio())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.7)
    return by_leaf[close[0]] if close else None


def _check_overrides(argv: list[str]) -> None:
    """``--config.KEY=...`` for a key the config file lacks: one line that names the nearest
    key at any depth. A config file that does not load is left to the flags parser."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if not path:
        return
    file, _, arg = path.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_keys", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        known = list(_config_keys(module.get_config(*([arg] if arg else []))))
    except Exception:  # noqa: BLE001  (reported by the flags parser, with its own words)
        return
    for a in argv:
        name = a.split("=", 1)[0]
        for prefix in ("--config.", "--noconfig."):
            key = name[len(prefix) :]
            if name.startswith(prefix) and key not in known:
                near = _nearest_key(key, known)
                hint = f' (did you mean "{near}"?)' if near else ""
                _error(f"unknown config key '{key}'{hint} (see --list-config)")


def parse(argv: list[str]) -> list[str]:
    """The command line -> absl flags; --help and its kinds exit 0 with where the config
    keys are; every error is one line (exit 2)."""
    argv = [argv[0]] + ["--list_config" if a == "--list-config" else a for a in argv[1:]]
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(__doc__.rstrip() + "\n\nflags:\n" + flags.FLAGS.main_module_help() + CONFIG_HELP)
        sys.exit(0)
    _check_overrides(argv)
    rest = parse_flags("train.py")(argv)
    if len(rest) > 1:
        _error(f"unexpected argument(s): {' '.join(rest[1:])} (flags are --name=value; see --help)")
    if _WORKDIR.value is None and not _LIST_CONFIG.value:
        _error("--workdir is required: the folder for checkpoints, logs and images (see --help)")
    return rest


def _error(message: str) -> None:
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv  # parse() refused any left over
    if _LIST_CONFIG.value:
        for key, value in _config_keys(_CONFIG.value).items():
            if not hasattr(value, "items"):
                print(f"{key} = {value!r}")
        return
    stop = StopRequest()  # from here on Ctrl-C and SIGTERM stop the run cleanly
    with stop.installed(), clean_errors("train.py"):
        setup()
        try:
            config = _CONFIG.value
            config.get("steps")  # a config file that failed to load raises on first use
        except OSError as e:
            why = str(e).strip().splitlines()[-1].strip()
            raise InvalidValueError(f"cannot load the config file: {why}") from None
        from vqvae import distributed

        flags_given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        several = distributed.multi_process(config.get("distributed", False), *flags_given)
        if several and not os.environ.get(distributed.SUPERVISED):
            distributed.supervise(sys.argv)  # the training runs in a child; exits here
        distributed.initialize(  # before anything touches a device
            config.get("distributed", False),
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            step_timeout_s=config.get("step_timeout_s", distributed.STEP_TIMEOUT_S),
        )
        from vqvae.trainer import Trainer  # the task is config.task's

        result = Trainer(config, _WORKDIR.value, stop=stop).train()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the run is over and saved: no longer early
        signal.signal(sig, signal.SIG_DFL)
    if result:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
        logging.info("final evaluation: %s", shown)


if __name__ == "__main__":
    app.run(main, flags_parser=parse)
