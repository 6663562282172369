"""The quantizer kinds by name: ``KINDS`` maps a name to its config class.

A model config holds the chosen kind's config (``VQConfig``, ``FSQConfig``, ...), stored in
every checkpoint as ``{"kind": name, **its fields}``. Adding a kind: one module with a
``Quantizer`` subclass and its config (a ``QuantizerConfig`` subclass with its fields,
``build``, ``vocab_size``, ``num_levels`` and ``describe``), and one line in ``KINDS`` (or
``register_kind`` from outside the package).
"""

import dataclasses
import importlib
import logging
from typing import Any

from vqvae.errors import InvalidValueError
from vqvae.quantizers.base import QuantizerConfig

log = logging.getLogger(__name__)

# kind -> its config class ("module:attribute", imported when first used, or the class)
KINDS: dict[str, str | type[QuantizerConfig]] = {
    "vq": "vqvae.quantizers.vq:VQConfig",
    "rvq": "vqvae.quantizers.rvq:RVQConfig",
    "fsq": "vqvae.quantizers.fsq:FSQConfig",
    "lfq": "vqvae.quantizers.lfq:LFQConfig",
}


def register_kind(name: str, config: type[QuantizerConfig] | str) -> None:
    """Make ``quantizer.kind = name`` use ``config`` (a class or "module:attribute")."""
    KINDS[name] = config


def kind_of(name: str) -> type[QuantizerConfig]:
    """The config class of the kind called ``name``."""
    if name not in KINDS:
        raise InvalidValueError(f"quantizer kind must be one of {sorted(KINDS)}, got {name!r}")
    config = KINDS[name]
    if isinstance(config, str):
        module, _, attr = config.partition(":")
        config = KINDS[name] = getattr(importlib.import_module(module), attr)
    return config


def _fields(name: str) -> dict[str, Any]:
    """A kind's fields and their defaults (every field of a kind's config has one)."""
    out = {}
    for f in dataclasses.fields(kind_of(name)):
        has_factory = f.default_factory is not dataclasses.MISSING
        out[f.name] = f.default_factory() if has_factory else f.default
    return out


def _every_default() -> dict[str, Any]:
    """Every registered kind's fields and defaults (the first kind's where two share one)."""
    out: dict[str, Any] = {}
    for name in KINDS:
        out |= {k: v for k, v in _fields(name).items() if k not in out}
    return out


def every_setting(config: QuantizerConfig) -> dict[str, Any]:
    """``config``'s dict with every registered kind's other fields beside it, at their
    defaults: the run config's quantizer section, in which any kind can be chosen from the
    command line (``quantizer_from_dict`` keeps the chosen kind's fields)."""
    return {"kind": config.kind, **_every_default(), **config.to_dict()}


def quantizer_from_dict(d: dict[str, Any]) -> QuantizerConfig:
    """The config of ``d["kind"]`` (default "vq") from its fields. Fields that only other
    registered kinds have are left out: a run config carries every kind's (see
    ``every_setting``), as did checkpoints before each kind had its own config; one set
    away from its default is named in a warning. A key no kind has is refused."""
    d = dict(d)
    name = d.pop("kind", "vq")
    own, known = _fields(name), _every_default()
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise InvalidValueError(f"unknown quantizer config keys: {unknown}")
    ignored = [  # (JSON gives lists for tuples)
        f"{k}={v!r}"
        for k, v in d.items()
        if k not in own and (tuple(v) if isinstance(v, list) else v) != known[k]
    ]
    if ignored:
        log.warning(
            "quantizer kind %r ignores %s (other kinds' settings)", name, ", ".join(ignored)
        )
    return kind_of(name)(**{k: v for k, v in d.items() if k in own})
