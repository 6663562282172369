"""Benchmark suite: training throughput, the nearest-code lookup, memory, the input
pipeline, and the two generators' sampling rates.

    python benchmarks/run.py [--preset sonnet-cifar|f8-256|all] [--quick] [--json out.json]
        [--only CASE ...] [--isolate auto|always|never]

Training cases time the package's own train step (``Trainer.compile_step``: one jit with
shardings and donation) on random uint8 images; the comparison case runs the same loss with
``@nnx.jit`` on the module and ``nnx.Optimizer``. Lookup cases time ``nearest_codes`` at each
precision against the naive full-matrix argmin. Times are medians over timed calls after
warm-up, each ended by ``block_until_ready``. Memory, per case: XLA's plan for the compiled
program (``program_bytes``: weights, inputs, outputs, temporaries; ``temp_bytes`` the
temporaries alone), on any backend; and the device's own peak where it reports one. That
peak is never reset within a process, so with ``--isolate auto`` (the default) every case
runs in a fresh process wherever the device reports it. FLOPs are analytic
(``vqvae.flops``). Loader cases time the folder source at 256 px on ImageNet-like JPEGs
(500 x 375) from the iterator's creation, worker start-up included: the decoding path from
before the grain pipeline, then the pipeline inline and with 1, 2, the default number of
workers and one per core (each case in a fresh process, the median of three runs).
Sampler cases time each generator's whole sampling program (random weights, labelled
batch, guidance off and at 3) at an ImageNet-256 f16 grid. ``--quick`` shrinks every
case to run on a CPU in a couple of minutes; it proves the suite runs, not how fast
anything is.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # configs/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from configs.common import base  # noqa: E402
from vqvae.data import resolve_workers  # noqa: E402
from vqvae.devicestats import (  # noqa: E402
    device_peak_bytes,
    in_fresh_process,
    program_bytes,
    reports_peak_memory,  # noqa: E402
)
from vqvae.flops import count_flops  # noqa: E402
from vqvae.model import PRESETS, to_model_range, vqvae_loss  # noqa: E402
from vqvae.quantizers import FSQConfig, LFQConfig, RVQConfig, VQConfig, nearest_codes  # noqa: E402
from vqvae.sharding import batch_sharding  # noqa: E402
from vqvae.trainer import Trainer  # noqa: E402

# Dense bfloat16 peak of the device from its data sheet, for MFU (None: unknown).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def peak_memory() -> int | None:
    return device_peak_bytes()[0]


def timed(fn, *args, warmup: int, iters: int) -> tuple[float, object]:
    """Median seconds of ``fn(*args)`` over ``iters`` calls after ``warmup`` calls."""
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# --- training ---------------------------------------------------------------------------
TRAIN_CASES = {
    "sonnet-cifar": dict(model=PRESETS["sonnet-cifar"], batch=256),
    "f8-256": dict(model=PRESETS["f8-256"], batch=32),
}
QUICK_TRAIN = {
    "sonnet-cifar": dict(model=PRESETS["sonnet-cifar"], batch=16),
    "f8-256": dict(
        model=PRESETS["f8-256"].replace(
            image_size=32, base_channels=16, quantizer=VQConfig(num_codes=512)
        ),
        batch=2,
    ),
}


# The VQGAN-family presets at their released shapes (256 px), at the batch a CPU can take;
# --quick: one of them at 32 px and a small width, to prove the case runs.
VQGAN_PRESETS = (
    "taming-f16-16384",
    "taming-f16-1024",
    "maskgit-f16-1024",
    "llamagen-vq16",
    "llamagen-vq8",
)
PRESET_CASES = {name: dict(model=PRESETS[name], batch=2) for name in VQGAN_PRESETS}
_SMALL = PRESETS["llamagen-vq16"]
QUICK_PRESETS = {
    "llamagen-vq16 at 32 px": dict(
        model=_SMALL.replace(
            image_size=32,
            vqgan=dataclasses.replace(_SMALL.vqgan, ch=32, ch_mult=(1, 2), attn_resolutions=(16,)),
        ),
        batch=2,
    )
}


# The quantizer kinds of the README's table, at 9 bits per token (and residual VQ at 18),
# each in the sonnet-cifar net: their train step's time against VQ's.
QUANTIZER_KINDS = {
    "vq 512": VQConfig(num_codes=512),
    "fsq (8,8,8)": FSQConfig(fsq_levels=(8, 8, 8)),
    "lfq 9 bits": LFQConfig(lfq_bits=9),
    "rvq 3 x 8": RVQConfig(num_codes=8, residual_levels=3),
    "rvq 2 x 512": RVQConfig(num_codes=512, residual_levels=2),
    # 16,384 codes: of the encoder's 64 dimensions (EMA, restarts), or factorised to 8 or 32
    # l2-normalised dimensions (gradient-learned as LlamaGen's, or EMA)
    "vq 16384 x 64 ema": VQConfig(num_codes=16384, dead_code_threshold=0.03),
    "vq 16384 x 8 l2 gradient": VQConfig(
        num_codes=16384, codebook_dim=8, normalize=True, learning="gradient"
    ),
    "vq 16384 x 8 l2 ema": VQConfig(
        num_codes=16384, codebook_dim=8, normalize=True, dead_code_threshold=0.03
    ),
    "vq 16384 x 32 l2 gradient": VQConfig(
        num_codes=16384, codebook_dim=32, normalize=True, learning="gradient"
    ),
    "vq 16384 x 32 l2 ema": VQConfig(
        num_codes=16384, codebook_dim=32, normalize=True, dead_code_threshold=0.03
    ),
}


def bench_quantizer(kind: str, case: dict, warmup: int, iters: int) -> dict:
    """The train step with this quantizer; for a codebook, also its nearest-code search
    alone at the step's shapes (every vector of the batch against every code) and that
    search's share of the step."""
    r = bench_train(f"sonnet-cifar, {kind}", case, warmup, iters, compare=False)
    model, qc = case["model"], case["model"].quantizer
    if isinstance(qc, VQConfig):
        n = r["batch"] * model.grid_size**2
        d = qc.codebook_dim or model.code_dim
        kz, ke = jax.random.split(jax.random.key(0))
        z = jax.random.normal(kz, (n, d), jnp.float32)
        e = jax.random.normal(ke, (qc.num_codes, d), jnp.float32)
        search = jax.jit(partial(nearest_codes, precision=qc.precision))
        secs, _ = timed(search, z, e, warmup=warmup, iters=iters)
        r["assign_ms"] = secs * 1e3
        r["assign_share"] = r["assign_ms"] / r["step_ms"]
    return r


def bench_train(name: str, case: dict, warmup: int, iters: int, compare: bool = True) -> dict:
    model_cfg, batch_size = case["model"], case["batch"]
    n = jax.device_count()
    batch_size = max(n, batch_size // n * n)  # a multiple of the device count
    config = base(model_cfg)
    config.batch_size, config.steps, config.tensorboard = batch_size, 1000, False
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
    rng = np.random.default_rng(0)
    size, c = model_cfg.image_size, model_cfg.channels
    host = {"image": rng.integers(0, 256, (batch_size, size, size, c), dtype=np.uint8)}
    batch = jax.device_put(host, batch_sharding(trainer.mesh))
    state = trainer.init_state()
    trainer.task.stats = {"data_variance": 0.06}

    t0 = time.perf_counter()
    step = trainer.compile_step().lower(state, batch, trainer.consts).compile()
    compile_s = time.perf_counter() - t0
    temp = step.memory_analysis().temp_size_in_bytes if step.memory_analysis() else None
    planned = program_bytes(step)

    def run(state):  # donation: each call consumes the state it is given
        return step(state, batch, trainer.consts)[0]

    with jax.set_mesh(trainer.mesh):
        for _ in range(warmup):
            state = jax.block_until_ready(run(state))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            state = jax.block_until_ready(run(state))
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)

    flops = _train_flops(model_cfg) * batch_size
    peak = device_peak()
    result = {
        "case": f"train {name}",
        "batch": batch_size,
        "images_per_s": batch_size / step_s,
        "step_ms": step_s * 1e3,
        "compile_s": compile_s,
        "tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None,
        "program_bytes": planned,
        "temp_bytes": temp,
        "peak_bytes": peak_memory(),  # before the comparison below adds its own
    }
    if compare:
        result |= _nnx_jit_comparison(model_cfg, host, warmup, iters, step_s)
    return result


def _train_flops(model_cfg) -> int:
    """Analytic FLOPs of one image's forward and backward pass."""
    model = nnx.eval_shape(lambda: model_cfg.build(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    size = model_cfg.image_size
    x = jax.ShapeDtypeStruct((1, size, size, model_cfg.channels), jnp.float32)

    def grad(p, r, x):
        loss = lambda p: vqvae_loss(nnx.merge(graphdef, p, r, copy=True), x, train=True)[0]  # noqa: E731
        return jax.grad(loss)(p)

    return count_flops(grad, params, rest, x)


def _nnx_jit_comparison(model_cfg, host, warmup, iters, split_merge_s) -> dict:
    """The same step with ``@nnx.jit`` on the module, on one device."""
    model = model_cfg.build(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-4), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, images):
        x = to_model_range(images)

        def loss(model):
            return vqvae_loss(model, x, train=True, data_variance=0.06)[0]

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    images = jnp.asarray(host["image"])
    step_s, _ = timed(nnx_step, model, optimizer, images, warmup=warmup, iters=iters)
    return {"nnx_jit_step_ms": step_s * 1e3, "nnx_jit_over_split_merge": step_s / split_merge_s}


# --- lookup -----------------------------------------------------------------------------
LOOKUP_CASES = {"lookup": (32768, 16384, 256), "lookup-large": (262144, 65536, 256)}
QUICK_LOOKUP = {"lookup": (16384, 4096, 16), "lookup-large": (32768, 8192, 16)}


LOOKUP_VARIANTS = ("highest", "default", "rerank", "naive full matrix")


def _lookup_fn(variant: str):
    if variant == "naive full matrix":
        return lambda z, e: jnp.argmin(
            jnp.sum(e * e, -1)[None] - 2 * jnp.dot(z, e.T, precision="highest"), axis=1
        )
    return partial(nearest_codes, precision=variant)


def bench_lookup(name, n, k, d, variant, warmup, iters) -> dict:
    kz, ke = jax.random.split(jax.random.key(0))
    z = jax.random.normal(kz, (n, d), jnp.float32)
    e = jax.random.normal(ke, (k, d), jnp.float32)
    compiled = jax.jit(_lookup_fn(variant)).lower(z, e).compile()
    mem = compiled.memory_analysis()
    secs, idx = timed(compiled, z, e, warmup=warmup, iters=iters)
    peak = peak_memory()  # this variant's alone: the exact reference runs after it
    exact = idx if variant == "highest" else jax.jit(_lookup_fn("highest"))(z, e)
    return {
        "case": f"{name} {n}x{k}x{d} {variant}",
        "ms": secs * 1e3,
        "tflops": 2 * n * k * d / secs / 1e12,
        "agree_exact": float(np.mean(np.asarray(idx) == np.asarray(exact))),
        "program_bytes": program_bytes(compiled),
        "temp_bytes": mem.temp_size_in_bytes if mem else None,
        "peak_bytes": peak,
    }


def _compare_to_naive(rows: list[dict]) -> None:
    """naive time / this and naive memory / this, for the rows of the naive case's shape."""
    for naive in [r for r in rows if r["case"].endswith("naive full matrix")]:
        shape = naive["case"].removesuffix(" naive full matrix")
        for r in rows:
            if r is naive or not r["case"].startswith(shape + " "):
                continue
            r["naive_over_this_time"] = naive["ms"] / r["ms"]
            if r["temp_bytes"]:
                r["naive_over_this_memory"] = naive["temp_bytes"] / r["temp_bytes"]


# --- the input pipeline -------------------------------------------------------------------
LOADER_RUNS = {False: 3, True: 1}  # fresh runs per loader case: full suite, --quick


def bench_loader(workers: int, quick: bool) -> dict:
    """One loader case, each run in a fresh process (benchmarks/loader.py: its worker
    processes import that small script, not this one, and no earlier case's workers
    linger); the median of a few runs, with the range of images/s beside it."""
    argv = [str(ROOT / "benchmarks" / "loader.py"), "--workers", str(workers)]
    runs = [
        in_fresh_process(argv + (["--quick"] if quick else [])) for _ in range(LOADER_RUNS[quick])
    ]
    row = {
        k: statistics.median(r[k] for r in runs) if isinstance(v, float) else v
        for k, v in runs[0].items()
    }
    rates = sorted(r["images_per_s"] for r in runs)
    row["runs"], row["images_per_s_range"] = len(runs), f"{rates[0]:.0f}-{rates[-1]:.0f}"
    return row


def _loader_summary(rows: list[dict]) -> None:
    """Speed-ups against the old path, and cores one 1,000 images/s accelerator needs."""
    old = next((r for r in rows if "old" in r["case"]), None)
    for r in rows:
        if old:
            r["over_old"] = r["images_per_s"] / old["images_per_s"]
        if "grain" in r["case"] and r["cores"] > 1:
            r["cores_for_1000_per_s"] = 1000 * r["cores"] / r["steady_images_per_s"]


# --- generation ---------------------------------------------------------------------------
# Both generators at one shape each: an ImageNet-256 f16 grid (16 x 16 tokens, 1,024 codes),
# class-conditional; --quick: a 4 x 4 grid and a small width.
SAMPLER_SHAPE = dict(vocab_size=1024, grid=(16, 16), num_classes=1000, width=512, depth=8,
                     heads=8)  # fmt: skip
QUICK_SAMPLER_SHAPE = dict(vocab_size=32, grid=(4, 4), num_classes=10, width=64, depth=2, heads=4)
SAMPLER_BATCH = {False: 64, True: 8}


def bench_sampler(kind: str, cfg_scale: float, quick: bool, warmup: int, iters: int) -> dict:
    """Samples per second of a generator with random weights: the AR prior's KV-cached
    sampling (one token per step) or the masked generator's 8 parallel decoding steps;
    with ``cfg_scale`` other than 1 the batch runs doubled for guidance."""
    from vqvae import maskgit, prior

    shape = QUICK_SAMPLER_SHAPE if quick else SAMPLER_SHAPE
    batch = SAMPLER_BATCH[quick]
    if kind == "prior":
        model = prior.PriorConfig(**shape).build(nnx.Rngs(0))
        run = partial(prior.sample, cfg_scale=cfg_scale)
    else:
        model = maskgit.MaskGITConfig(**shape).build(nnx.Rngs(0))
        run = partial(maskgit.sample, steps=8, cfg_scale=cfg_scale)
    graphdef, state = nnx.split(model)
    labels = jnp.arange(batch, dtype=jnp.int32) % shape["num_classes"]

    @jax.jit
    def generate(state, key):
        return run(nnx.merge(graphdef, state), key, labels)

    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = generate.lower(state, key).compile()
    compile_s = time.perf_counter() - t0
    seconds, out = timed(compiled, state, key, warmup=warmup, iters=iters)
    assert out.shape == (batch, shape["grid"][0] * shape["grid"][1])
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "case": f"{kind} sampling, cfg {cfg_scale:g}",
        "grid": "x".join(map(str, shape["grid"])),
        "params": int(params),
        "batch": batch,
        "samples_per_s": batch / seconds,
        "ms_per_sample": 1000 * seconds / batch,
        "compile_s": compile_s,
    }


# --- the cases ----------------------------------------------------------------------------
def cases(presets: list[str], quick: bool) -> dict:
    """Every case by name -> (group, a function returning its row)."""
    warmup, iters = (1, 3) if quick else (3, 20)
    train_cases = QUICK_TRAIN if quick else TRAIN_CASES
    out = {}
    for name in presets:
        out[f"train {name}"] = (
            "train",
            partial(bench_train, name, train_cases[name], warmup, iters),
        )
    for name, (n, k, d) in (QUICK_LOOKUP if quick else LOOKUP_CASES).items():
        # the naive N x K matrix of the large case would need 64 GiB: not run
        for variant in LOOKUP_VARIANTS[: None if name == "lookup" else -1]:
            fn = partial(bench_lookup, name, n, k, d, variant, warmup, iters)
            out[f"{name} {variant}"] = ("lookup", fn)
    preset_warmup, preset_iters = (1, 2) if quick else (1, 3)  # seconds per step on a CPU
    for name, case in (QUICK_PRESETS if quick else PRESET_CASES).items():
        fn = partial(bench_train, name, case, preset_warmup, preset_iters, compare=False)
        out[f"preset {name}"] = ("preset", fn)
    base_case = train_cases["sonnet-cifar"]
    for kind, qc in QUANTIZER_KINDS.items():
        case = {**base_case, "model": base_case["model"].replace(quantizer=qc)}
        out[f"quantizer {kind}"] = (
            "quantizer",
            partial(bench_quantizer, kind, case, warmup, iters),
        )
    for kind in ("prior", "maskgit"):
        for scale in (1.0, 3.0):
            fn = partial(bench_sampler, kind, scale, quick, warmup, iters)
            out[f"sampler {kind} cfg {scale:g}"] = ("sampler", fn)
    cores = max(1, len(os.sched_getaffinity(0)))
    auto = resolve_workers(-1, parallel=True)  # what a folder source gets by default
    for workers in dict.fromkeys([-1, 0, 1, 2, auto, cores]):
        name = "loader old" if workers < 0 else f"loader {workers} workers"
        out[name] = ("loader", partial(bench_loader, workers, quick))
    return out


# --- output -----------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="all", choices=["sonnet-cifar", "f8-256", "all"])
    p.add_argument("--quick", action="store_true", help="tiny shapes: a CPU smoke run")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only", nargs="+", default=None, metavar="CASE", help="run these cases")
    p.add_argument(
        "--isolate",
        default="auto",
        choices=["auto", "always", "never"],
        help="a fresh process per case (auto: where the device reports peak memory)",
    )
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, as JSON
    args = p.parse_args(argv)
    presets = ["sonnet-cifar", "f8-256"] if args.preset == "all" else [args.preset]
    registry = cases(presets, args.quick)
    if args.case:
        print(json.dumps(registry[args.case][1]()))
        return
    chosen = args.only or list(registry)
    unknown = [c for c in chosen if c not in registry]
    if unknown:
        p.error(f"unknown case(s) {unknown}; the cases: {sorted(registry)}")
    isolate = args.isolate == "always" or (args.isolate == "auto" and reports_peak_memory())
    device = jax.devices()[0]
    env = {
        "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "isolated": isolate,
    }
    print(f"# {env['device']}, jax {env['jax']}, {env['date']}", file=sys.stderr)
    groups: dict[str, list[dict]] = {}
    for name in chosen:
        group, fn = registry[name]
        if isolate:
            argv = [str(Path(__file__).resolve()), "--preset", args.preset, "--case", name]
            row = in_fresh_process(argv + (["--quick"] if args.quick else []))
        else:
            row = fn()
        groups.setdefault(group, []).append(row)
    _compare_to_naive(groups.get("lookup", []))
    _loader_summary(groups.get("loader", []))
    for r in groups.get("quantizer", []):
        vq = groups["quantizer"][0]["step_ms"]  # vq first, in the same run
        r["step_over_vq"] = r["step_ms"] / vq
    for rows in groups.values():
        print(table(rows))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, **groups}, indent=2))


if __name__ == "__main__":
    main()
