"""Efficiency report of a tokenizer: size, FLOPs, compression, latency and throughput.

    python -m vqvae.report --workdir DIR          # a trained model (from its checkpoint)
    python -m vqvae.report --preset f8-256        # or an architecture alone
    python -m vqvae.report --config configs/default.py

Figures marked [hw] depend on the device they are measured on; the rest follow from the
architecture alone. Memory is XLA's plan for each compiled program (weights, inputs, outputs and
temporaries) everywhere, and the
device's own peak (weights included; each program in a fresh process) where the device
reports one; energy per image comes from NVML on NVIDIA GPUs (``pip install 'vqvae[gpu]'``).
A figure a device cannot give reads "n/a: <why>".
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vqvae.devicestats import (
    device_peak_bytes,
    energy_per_item,
    in_fresh_process,
    program_bytes,
    reports_peak_memory,
)
from vqvae.flops import count_flops
from vqvae.model import PRESETS, VQVAEConfig
from vqvae.quantizers import Codebook


def _count(tree) -> int:
    """Elements of every array in a tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def static_figures(config: VQVAEConfig) -> dict:
    """Everything that follows from the architecture: parameters, FLOPs, bits."""
    model = nnx.eval_shape(lambda: config.build(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params, n_state = _count(params), _count(rest)
    # an EMA codebook is state, not a parameter, but inference needs it all the same
    n_codebook = _count(nnx.state(model, Codebook))
    n_weights = n_params + n_codebook
    q = model.quantizer
    image, c = config.image_size, config.channels
    x = jax.ShapeDtypeStruct((1, image, image, c), jnp.float32)
    h = config.grid_size
    idx = jax.ShapeDtypeStruct((1, h, h, *q.token_shape), jnp.int32)

    def encode(p, r, x):
        return nnx.merge(graphdef, p, r).encode_to_indices(x)

    def decode(p, r, idx):
        return nnx.merge(graphdef, p, r).decode_indices(idx)

    enc, dec = count_flops(encode, params, rest, x), count_flops(decode, params, rest, idx)
    bits = h * h * q.bits_per_token
    raw = image * image * c * 8
    return {
        "parameters": n_params,
        "quantizer": config.quantizer.describe(config.code_dim),
        "inference_weights": n_weights,  # parameters and codebook
        "size_mb_float32": n_weights * 4 / 1e6,
        "size_mb_bfloat16": n_weights * 2 / 1e6,
        "training_only_state": n_state - n_codebook,  # EMA sums and counts, restart key
        "encode_gflops_per_image": enc / 1e9,
        "encode_gmacs_per_image": enc / 2e9,
        "decode_gflops_per_image": dec / 1e9,
        "decode_gmacs_per_image": dec / 2e9,
        "tokens_per_image": h * h * q.num_levels,
        "token_grid": f"{h}x{h}" + (f"x{q.num_levels}" if q.num_levels > 1 else ""),
        "bits_per_image": bits,
        "raw_bits_per_image": raw,
        "compression_ratio": raw / bits,
        **_attention_cost(config),
    }


def _attention_cost(config: VQVAEConfig) -> dict:
    """What the VQGAN net's attention costs per image: its blocks, the largest grid, and the
    float32 (N, N) logits of every block together, which XLA's unfused path materialises
    (and training keeps for the backward pass); a fused kernel (cuDNN) does not."""
    if config.net != "vqgan":
        return {}
    sides = config.vqgan.attention_sides(config.image_size)
    logits = sum((s * s) ** 2 * 4 for s in sides)
    return {
        "attention_blocks": len(sides),
        "attention_largest_grid": f"{max(sides)}x{max(sides)}" if sides else "-",
        "attention_logits_mib_per_image": logits / 2**20,
    }


def _programs(model, config: VQVAEConfig, batch: int):
    """Jitted encode, decode and round trip with example inputs at ``batch``."""
    graphdef, state = nnx.split(model)
    merge = lambda s: nnx.merge(graphdef, s)  # noqa: E731
    encode = jax.jit(lambda s, x: merge(s).encode_to_indices(x))
    decode = jax.jit(lambda s, i: merge(s).decode_indices(i))
    roundtrip = jax.jit(lambda s, x: merge(s).decode_indices(merge(s).encode_to_indices(x)))
    size, c, h = config.image_size, config.channels, config.grid_size
    x = jnp.zeros((batch, size, size, c))
    levels = config.quantizer.num_levels
    idx = jnp.zeros((batch, h, h, *(() if levels == 1 else (levels,))), jnp.int32)
    return state, {"encode": (encode, x), "decode": (decode, idx), "roundtrip": (roundtrip, x)}


def hardware_figures(
    model, config: VQVAEConfig, batch: int = 64, iters: int = 10, source_argv=()
) -> dict:
    """[hw] latency at batch 1, throughput, memory and energy per image at ``batch``."""
    state, programs = _programs(model, config, batch)
    roundtrip, x = programs["roundtrip"]

    def median_time(x):
        jax.block_until_ready(roundtrip(state, x))  # compile and warm up
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(roundtrip(state, x))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    one = median_time(x[:1])
    many = median_time(x)
    out = {
        "device": f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})",
        "latency_ms_batch1": one * 1e3,
        f"images_per_s_batch{batch}": batch / many,
    }
    for name in ("encode", "decode"):
        fn, arg = programs[name]
        planned = program_bytes(fn.lower(state, arg).compile())
        out[f"{name}_xla_memory_mb_batch{batch}"] = planned / 1e6 if planned else "n/a"
    for name in ("encode", "decode"):
        key = f"{name}_device_peak_mb_batch{batch}"
        if reports_peak_memory():
            argv = ["-m", "vqvae.report", *source_argv, "--batch", str(batch), "--peak-of", name]
            out[key] = in_fresh_process(argv)["peak_bytes"] / 1e6
        else:
            out[key] = device_peak_bytes()[1]
    joules, note = energy_per_item(lambda: jax.block_until_ready(roundtrip(state, x)), batch)
    out["energy_mj_per_image"] = joules * 1e3 if joules is not None else note
    return out


def _peak_of(model, config: VQVAEConfig, batch: int, name: str) -> None:
    """Run one program once and print the device's peak memory as JSON (a child process)."""
    state, programs = _programs(model, config, batch)
    fn, arg = programs[name]
    jax.block_until_ready(fn(state, arg))
    print(json.dumps({"peak_bytes": device_peak_bytes()[0]}))


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
    p.add_argument("--peak-of", choices=["encode", "decode"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from vqvae.runtime import clean_errors, setup

    setup()
    with clean_errors("report"):
        config, model = _config_from_args(args)
        model = model if model is not None or args.no_timing else config.build(nnx.Rngs(0))
        if args.peak_of:
            return _peak_of(model, config, args.batch, args.peak_of)
        rows = static_figures(config)
        hw = {}
        if not args.no_timing:
            source = [
                f"--{k}={v}" for k in ("workdir", "preset", "config") if (v := getattr(args, k))
            ]
            hw = hardware_figures(model, config, args.batch, source_argv=source)
    width = max(map(len, [*rows, *hw]))
    for k, v in rows.items():
        print(f"{k:{width}s} {_fmt(v)}")
    for k, v in hw.items():
        print(f"{k:{width}s} {_fmt(v)}   [hw]")


def _fmt(v) -> str:
    """One style for every figure: thousands separated, no exponents above 0.001; whole
    numbers without decimals, others to 4 significant digits."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or (math.isfinite(v) and v == int(v) and abs(v) < 1e15):
        return f"{int(v):,}"
    if not math.isfinite(v) or abs(v) < 1e-3:
        return f"{v:.3e}"
    decimals = max(0, 3 - math.floor(math.log10(abs(v))))
    return f"{v:,.{decimals}f}"


if __name__ == "__main__":
    main()
