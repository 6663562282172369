"""Efficiency report of a tokenizer: size, FLOPs, compression, latency and throughput.

    python -m vqvae.report --workdir DIR          # a trained model (from its checkpoint)
    python -m vqvae.report --preset f8-256        # or an architecture alone
    python -m vqvae.report --config configs/default.py

Figures marked [hw] depend on the device they are measured on; the rest follow from the
architecture alone.
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.flops import count_flops
from vqvae.model import PRESETS, VQVAEConfig


def static_figures(config: VQVAEConfig) -> dict:
    """Everything that follows from the architecture: parameters, FLOPs, bits."""
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    n_state = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(rest) if hasattr(p, "shape"))
    # an EMA codebook is state, not a parameter, but inference needs it all the same
    n_codebook = 0 if config.codebook_learning == "gradient" else config.num_codes * config.code_dim
    n_weights = n_params + n_codebook
    size, c = config.image_size, config.channels
    x = jax.ShapeDtypeStruct((1, size, size, c), jnp.float32)
    h = config.grid_size
    idx = jax.ShapeDtypeStruct((1, h, h), jnp.int32)

    def encode(p, r, x):
        return nnx.merge(graphdef, p, r).encode_to_indices(x)

    def decode(p, r, idx):
        return nnx.merge(graphdef, p, r).decode_indices(idx)

    enc, dec = count_flops(encode, params, rest, x), count_flops(decode, params, rest, idx)
    tokens = h * h
    bits = tokens * math.log2(config.num_codes)
    raw = size * size * c * 8
    return {
        "parameters": n_params,
        "codebook": f"{config.num_codes} x {config.code_dim}",
        "inference_weights": n_weights,  # parameters and codebook
        "size_mb_float32": n_weights * 4 / 1e6,
        "size_mb_bfloat16": n_weights * 2 / 1e6,
        "training_only_state": n_state - n_codebook,  # EMA sums and counts, restart key
        "encode_gflops_per_image": enc / 1e9,
        "encode_gmacs_per_image": enc / 2e9,
        "decode_gflops_per_image": dec / 1e9,
        "decode_gmacs_per_image": dec / 2e9,
        "tokens_per_image": tokens,
        "token_grid": f"{h}x{h}",
        "bits_per_image": bits,
        "raw_bits_per_image": raw,
        "compression_ratio": raw / bits,
    }


def hardware_figures(model, config: VQVAEConfig, batch: int = 64, iters: int = 10) -> dict:
    """[hw] latency at batch 1 and throughput at ``batch``, encode + decode."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def roundtrip(state, x):
        m = nnx.merge(graphdef, state)
        return m.decode_indices(m.encode_to_indices(x))

    def median_time(x):
        jax.block_until_ready(roundtrip(state, x))  # compile and warm up
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(roundtrip(state, x))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    size, c = config.image_size, config.channels
    one = median_time(jnp.zeros((1, size, size, c)))
    many = median_time(jnp.zeros((batch, size, size, c)))
    return {
        "device": f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})",
        "latency_ms_batch1": one * 1e3,
        f"images_per_s_batch{batch}": batch / many,
    }


def _config_from_args(args):
    if args.workdir:
        from vqvae.checkpoint import load_model

        model, meta = load_model(args.workdir)
        return VQVAEConfig.from_dict(meta["model"]), model
    if args.preset:
        config = PRESETS[args.preset]
    else:
        import importlib.util

        sys.path.insert(0, str(Path(args.config).resolve().parent.parent))
        spec = importlib.util.spec_from_file_location("report_config", args.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = VQVAEConfig.from_dict(dict(module.get_config().model))
    return config, None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vqvae.report", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training workdir (latest checkpoint)")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a preset architecture")
    src.add_argument("--config", help="a config file (configs/NAME.py)")
    p.add_argument("--batch", type=int, default=64, help="batch for the throughput figure")
    p.add_argument("--no-timing", action="store_true", help="skip the [hw] figures")
    args = p.parse_args(argv)
    from vqvae.runtime import clean_errors, setup

    setup()
    with clean_errors("report"):
        config, model = _config_from_args(args)
        rows = static_figures(config)
        hw = {}
        if not args.no_timing:
            model = model if model is not None else config.build(nnx.Rngs(0))
            hw = hardware_figures(model, config, args.batch)
    for k, v in rows.items():
        print(f"{k:28s} {_fmt(v)}")
    for k, v in hw.items():
        print(f"{k:28s} {_fmt(v)}   [hw]")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


if __name__ == "__main__":
    main()
