"""The benchmark suite runs (--quick) and reports every figure it promises; no speed asserts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark launches: left out of make test-fast

ROOT = Path(__file__).resolve().parent.parent


# One case or two of every group (the whole --quick suite takes 4 minutes here; every case
# name is checked to be registered by the test below)
QUICK_CASES = [
    "train sonnet-cifar", "lookup highest", "lookup rerank", "lookup naive full matrix",
    "lookup-large default", "preset llamagen-vq16 at 32 px", "quantizer vq 512",
    "quantizer rvq 3 x 8", "sampler prior cfg 3", "sampler maskgit cfg 1", "loader old",
    "loader 0 workers",
]  # fmt: skip


def test_the_suite_registers_every_case_it_promises():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    names = run.cases(["sonnet-cifar", "f8-256"], quick=True)
    groups = {}
    for name, (group, fn) in names.items():
        assert callable(fn)
        groups.setdefault(group, []).append(name)
    assert set(groups) == {"train", "lookup", "preset", "quantizer", "sampler", "loader"}
    assert len(groups["train"]) == 2 and len(groups["quantizer"]) == len(run.QUANTIZER_KINDS)
    assert len(groups["sampler"]) == 4 and groups["quantizer"][0] == "quantizer vq 512"
    assert {"loader old", "loader 0 workers", "loader 1 workers"} <= set(groups["loader"])
    assert set(QUICK_CASES) <= set(names)
    full = run.cases(["sonnet-cifar", "f8-256"], quick=False)
    assert sum(g == "preset" for g, _ in full.values()) == len(run.VQGAN_PRESETS)


def test_quick_benchmark_suite_runs(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--quick", "--json", str(out), "--only", *QUICK_CASES]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["env"]["quick"] is True and result["env"]["isolated"] is False  # CPU: no peak
    train = {r["case"]: r for r in result["train"]}
    assert set(train) == {"train sonnet-cifar"}
    for r in train.values():
        assert r["images_per_s"] > 0 and r["compile_s"] > 0 and r["tflops"] > 0
        assert r["program_bytes"] > r["temp_bytes"] > 0
        assert r["nnx_jit_over_split_merge"] > 0
    (preset,) = result["preset"]  # a VQGAN preset, shrunk
    assert preset["case"] == "train llamagen-vq16 at 32 px" and preset["step_ms"] > 0
    assert preset["program_bytes"] > preset["temp_bytes"] > 0
    lookup = {r["case"]: r for r in result["lookup"]}
    assert any("naive full matrix" in c for c in lookup) and any("rerank" in c for c in lookup)
    for case, r in lookup.items():
        assert r["agree_exact"] >= 0.999, case  # every variant, exactness is checked
    blocked = next(r for c, r in lookup.items() if c.startswith("lookup ") and "highest" in c)
    assert blocked["naive_over_this_memory"] > 1  # the blocked lookup needs less memory
    loader = {r["case"]: r for r in result["loader"]}
    assert any("old" in c for c in loader) and any("0 worker" in c for c in loader)
    for case, r in loader.items():
        assert r["images"] == 160 and r["images_per_s"] > 0 and r["first_batch_s"] > 0, case
        assert "over_old" in r  # every row against the old path, measured in the same run
    vq, rvq = result["quantizer"]  # in the order asked: the ratio is against vq's step
    assert vq["step_over_vq"] == 1.0 and rvq["step_over_vq"] > 0 and "rvq" in rvq["case"]
    assert vq["assign_ms"] > 0 and 0 < vq["assign_share"] == vq["assign_ms"] / vq["step_ms"]
    sampler = {r["case"]: r for r in result["sampler"]}
    assert set(sampler) == {"prior sampling, cfg 3", "maskgit sampling, cfg 1"}
    for r in sampler.values():
        assert r["samples_per_s"] > 0 and r["params"] > 0 and r["grid"] == "4x4"
    assert "| case |" in proc.stdout


def test_a_case_runs_alone_in_a_fresh_process(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--quick", "--isolate", "always", "--only", "lookup rerank", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["env"]["isolated"] is True and "train" not in result
    (row,) = result["lookup"]
    assert row["case"] == "lookup 16384x4096x16 rerank" and row["agree_exact"] >= 0.999
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown case(s) ['nope']" in bad.stderr
