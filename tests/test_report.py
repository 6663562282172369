"""The efficiency report: analytic figures checked by hand, and the command line."""

import json
import subprocess
import sys

import pytest

from vqvae.model import PRESETS
from vqvae.report import static_figures


def test_sonnet_figures_by_hand():
    r = static_figures(PRESETS["sonnet-cifar"])
    assert r["parameters"] == 662_723
    assert r["inference_weights"] == 662_723 + 512 * 64
    assert r["size_mb_float32"] == pytest.approx(r["inference_weights"] * 4 / 1e6)
    # encoder: the two strided convs, the 3x3, two residual blocks, the 1x1, then the lookup
    macs = (
        16 * 16 * 16 * 3 * 64
        + 8 * 8 * 16 * 64 * 128
        + 8 * 8 * 9 * 128 * 128
        + 2 * 8 * 8 * (9 * 128 * 32 + 32 * 128)
        + 8 * 8 * 128 * 64
        + 8 * 8 * 512 * 64
    )
    assert r["encode_gflops_per_image"] == pytest.approx(2 * macs / 1e9)
    assert r["encode_gmacs_per_image"] == pytest.approx(macs / 1e9)
    assert r["tokens_per_image"] == 64 and r["bits_per_image"] == 64 * 9
    assert r["compression_ratio"] == pytest.approx(32 * 32 * 3 * 8 / (64 * 9))


def test_f8_forward_flops_match_the_reference_count():
    r = static_figures(PRESETS["f8-256"])
    # the reference puts forward + backward at about 384 GFLOP (3x forward, lookup aside)
    lookup = 2 * 1024 * 16384 * 256 / 1e9
    convs = r["encode_gflops_per_image"] - lookup + r["decode_gflops_per_image"]
    assert 3 * convs == pytest.approx(384, rel=0.02)


@pytest.mark.slow  # script launches
def test_report_command(trained10):
    out = subprocess.run(
        [sys.executable, "-m", "vqvae.report", "--workdir", str(trained10), "--batch", "8"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "compression_ratio" in out.stdout and "latency_ms_batch1" in out.stdout
    hw = dict(
        line.rsplit(None, 1)[0].split(None, 1) for line in out.stdout.splitlines() if "[hw]" in line
    )
    assert len(hw) == 8
    for name in ("encode", "decode"):
        assert float(hw[f"{name}_xla_memory_mb_batch8"].replace(",", "")) > 0
        assert (
            hw[f"{name}_device_peak_mb_batch8"]
            == "n/a: the cpu device reports no memory statistics"
        )
    assert hw["energy_mj_per_image"] == "n/a: the cpu device reports no power"
    # the child that measures one program's device peak in a fresh process
    child = subprocess.run(
        [sys.executable, "-m", "vqvae.report", "--workdir", str(trained10), "--peak-of", "decode"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert child.returncode == 0 and json.loads(child.stdout) == {"peak_bytes": None}


def test_planned_memory_is_weights_inputs_and_temporaries_and_grows_with_batch():
    from flax import nnx

    from vqvae.devicestats import program_bytes
    from vqvae.report import _programs

    config = PRESETS["sonnet-cifar"]
    model = config.build(nnx.Rngs(0))
    sizes = {}
    for batch in (8, 64):
        state, programs = _programs(model, config, batch)
        fn, x = programs["encode"]
        compiled = fn.lower(state, x).compile()
        m = compiled.memory_analysis()
        sizes[batch] = program_bytes(compiled)
        assert (
            sizes[batch] == m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        )
        assert m.argument_size_in_bytes > x.nbytes  # the encoder's weights are in it
    assert sizes[64] > 4 * sizes[8] > 0


def test_report_figures_share_one_format():
    import numpy as np

    from vqvae.report import _fmt

    assert _fmt(14336.0) == "14,336" and _fmt(np.float32(14336)) == "14,336"  # bits_per_image
    assert _fmt(662_723) == "662,723" and _fmt(np.int64(3)) == "3"
    assert _fmt(1234.5678) == "1,235" and _fmt(2.6534) == "2.653" and _fmt(0.05123) == "0.05123"
    assert _fmt("n/a: no NVML") == "n/a: no NVML"
    assert "e" not in "".join(_fmt(v) for v in (1e4 + 0.25, 99999.5, 1e9, 0.001))
