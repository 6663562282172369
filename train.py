"""Train a VQ-VAE tokenizer.

    python train.py --config configs/default.py --workdir workdir/default [--config.key=value]

Running it again with the same workdir resumes from the latest checkpoint. SIGTERM or
Ctrl-C saves a checkpoint and exits. ``config.task`` says what is trained: the tokenizer
(default) or a prior over its tokens. Across processes (one per host, say):

    python train.py ... --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

(or under Slurm / Open MPI, or with ``--config.distributed=True``, without the flags).
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from vqvae.runtime import StopRequest, clean_errors, parse_flags, setup

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and images.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0 (every process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    stop = StopRequest()  # from here on Ctrl-C and SIGTERM stop the run cleanly
    with stop.installed(), clean_errors("train.py"):
        setup()
        try:
            config = _CONFIG.value
            config.get("steps")  # a config file that failed to load raises on first use
        except OSError as e:
            why = str(e).strip().splitlines()[-1].strip()
            raise ValueError(f"cannot load the config file: {why}") from None
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
            step_timeout_s=config.get("step_timeout_s", 300),
        )
        from vqvae.trainer import Trainer  # the task is config.task's

        result = Trainer(config, _WORKDIR.value, stop=stop).train()
    if result:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items())
        logging.info("final evaluation: %s", shown)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags("train.py"))
