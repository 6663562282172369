"""Images from a trained generator (the AR prior or the masked generator) and its tokenizer:
what ``sample.py --mode generate`` draws and ``python -m vqvae.evaluate --generator`` scores.
"""

import jax
import numpy as np

from vqvae.errors import InvalidValueError

MASKGIT_ONLY = ("steps", "choice_temperature")


def _prior_sampler(model, settings: dict):
    from vqvae import prior

    settings = {k: v for k, v in settings.items() if k not in MASKGIT_ONLY}
    prior.check_sampling(**settings)
    return prior.sample, settings


def _maskgit_sampler(model, settings: dict):
    from vqvae import maskgit

    if "steps" in settings:  # a bad --steps: one line
        maskgit.decode_schedule(model.seq_len, settings["steps"])
    return maskgit.sample, settings


# checkpoint kind -> (model, settings) -> (its sampler, the settings it takes), checked
SAMPLERS = {"prior": _prior_sampler, "maskgit": _maskgit_sampler}
GENERATORS = tuple(SAMPLERS)  # checkpoint kinds that generate


def load_generator(workdir, step: int | None = None) -> tuple[str, object, dict]:
    """(kind, model, meta) of a prior's or a masked generator's checkpoint."""
    from vqvae.checkpoint import CheckpointError, load_model

    *others, last = GENERATORS
    for kind in others:
        try:
            return (kind, *load_model(workdir, step, kind=kind))
        except CheckpointError as e:
            if "holds a" not in str(e):  # not "holds a <another kind>": a real problem
                raise
    return (last, *load_model(workdir, step, kind=last))


class Generator:
    """A generator's checkpoint with its tokenizer, sampling with fixed ``settings`` (the
    sampler's: temperature, top_k, top_p, cfg_scale, cfg_schedule; the masked generator's
    also steps and choice_temperature; the other kind's are ignored)."""

    def __init__(self, workdir, step: int | None = None, **settings):
        from flax import nnx  # here, not at import: sample.py's flags need no Flax

        from vqvae.tokenizer import Tokenizer

        self.kind, self.model, self.meta = load_generator(workdir, step)
        sampler, settings = SAMPLERS[self.kind](self.model, settings)
        self.settings = settings
        self.tokenizer = Tokenizer.load(self.meta["tokenizer"])
        graphdef, self._state = nnx.split(self.model)
        self._draw = jax.jit(
            lambda state, key, labels: sampler(nnx.merge(graphdef, state), key, labels, **settings)
        )

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def labels(self, num: int, label: int | str = -1) -> np.ndarray:
        """``num`` labels: ``label`` for all (-1: unconditional); "all": every class in
        turn, as a generation FID over all classes draws them (unconditional for an
        unconditional generator); "each": ``num / num_classes`` of each class, class by
        class (a grid's rows)."""
        if label == "each":
            if not self.num_classes or num % self.num_classes:
                raise InvalidValueError(
                    f"label 'each' needs a class-conditional generator and a number of "
                    f"samples divisible by its {self.num_classes} classes, got {num}"
                )
            return np.repeat(np.arange(self.num_classes, dtype=np.int32), num // self.num_classes)
        if label == "all":
            if not self.num_classes:
                return np.full(num, -1, np.int32)
            return np.arange(num, dtype=np.int32) % self.num_classes
        if label >= self.num_classes or label < -1:
            raise InvalidValueError(
                f"label {label}: the {self.kind} knows {self.num_classes} classes"
            )
        return np.full(num, label, np.int32)

    def tokens(self, labels: np.ndarray, seed: int = 0) -> np.ndarray:
        """Token grids for ``labels`` (B,): int32 (B, h, w[, levels]); a seed draws the
        same grids every time."""
        flat = np.asarray(self._draw(self._state, jax.random.key(seed), jax.numpy.asarray(labels)))
        tok = self.tokenizer
        return flat.reshape(len(labels), *tok.grid_shape(), *tok.token_levels)

    def images(self, labels: np.ndarray, seed: int = 0, batch: int = 64):
        """Decoded uint8 images (B, H, W, C) for ``labels``, ``batch`` at a time (batch i
        with seed ``[seed, i]``; the last batch padded, so one program serves all)."""
        for i, start in enumerate(range(0, len(labels), batch)):
            part = labels[start : start + batch]
            padded = np.concatenate([part, np.full(batch - len(part), part[-1], np.int32)])
            key_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0] >> 1)
            yield self.tokenizer.decode(self.tokens(padded, key_seed))[: len(part)]


def class_label(text: str):
    """--label: a class id (-1: none), "all" or "each"."""
    if text in ("all", "each"):
        return text
    try:
        return int(text)
    except ValueError:
        raise InvalidValueError(
            f"--label must be a class id, 'all' or 'each', got {text!r}"
        ) from None


def add_sampling_flags(p, where: str) -> None:
    """The sampler's command-line flags (``where``: the mode they belong to, for --help)."""
    p.add_argument("--temperature", type=float, default=1.0, help=f"{where}: temperature")
    p.add_argument("--top-k", type=int, default=0, help=f"{where}: keep the k best (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help=f"{where}: nucleus (1: all)")
    p.add_argument(
        "--cfg-scale", type=float, default=1.0, help=f"{where}: classifier-free guidance (1: none)"
    )
    p.add_argument(
        "--cfg-schedule",
        default="constant",
        choices=["constant", "linear"],
        help=f"{where}: guidance constant, or rising linearly from 1 to --cfg-scale",
    )
    p.add_argument("--steps", type=int, default=8, help=f"{where}, maskgit: decoding steps")
    p.add_argument(
        "--choice-temperature",
        type=float,
        default=4.5,
        help=f"{where}, maskgit: weight of the annealed noise on which tokens to keep",
    )
    p.add_argument(
        "--label",
        type=class_label,
        default=-1,
        help=f"{where}: class (-1: none, unconditional; 'all': every class in turn; 'each': "
        "as many of each class, class by class)",
    )
    p.add_argument("--seed", type=int, default=0, help=f"{where}: random seed")


def sampling_settings(args) -> dict:
    """The sampler's settings from ``add_sampling_flags``'s flags; ``ValueError`` in one
    line for a value no sampler takes."""
    if args.temperature <= 0:
        raise InvalidValueError("--temperature must be positive")
    if not 0 < args.top_p <= 1 or args.cfg_scale < 0 or args.top_k < 0:
        raise InvalidValueError("--top-p must be in (0, 1], --cfg-scale and --top-k at least 0")
    return dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg_scale,
        cfg_schedule=args.cfg_schedule,
        steps=args.steps,
        choice_temperature=args.choice_temperature,
    )


__all__ = [
    "GENERATORS",
    "Generator",
    "add_sampling_flags",
    "load_generator",
    "sampling_settings",
]
