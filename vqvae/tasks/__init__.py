"""Kinds of training: each a ``Task`` that the one loop in ``vqvae.trainer`` runs.

``config.task`` picks one: ``tokenizer`` (the VQ-VAE, the default), ``prior`` (an
autoregressive transformer over a trained tokenizer's tokens) or ``maskgit`` (a masked
bidirectional one). A new kind is one module here with a
``Task`` subclass, and one line in ``TASKS``.
"""

from vqvae.errors import InvalidValueError
from vqvae.tasks.base import MODEL_KEYS, Task, make_optimizer, make_train_step

TASKS = {
    "tokenizer": "vqvae.tasks.tokenizer:TokenizerTask",
    "prior": "vqvae.tasks.prior:PriorTask",
    "maskgit": "vqvae.tasks.maskgit:MaskGITTask",
}


def make_task(config, arrays=None) -> Task:
    """The task ``config.task`` names (default: tokenizer)."""
    import importlib

    name = config.get("task", "tokenizer")
    if name not in TASKS:
        raise InvalidValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(config, arrays)


__all__ = ["MODEL_KEYS", "TASKS", "Task", "make_optimizer", "make_task", "make_train_step"]
