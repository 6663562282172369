"""What the hardware says about a program: XLA's memory plan, the device's peak, energy.

Used by the efficiency report and the benchmark suite. Each figure is ``(value, note)``:
the value, or None with a note saying why there is none on this device.
"""

import json
import subprocess
import sys
import time

import jax


def program_bytes(compiled) -> int | None:
    """Device memory XLA plans for a compiled program: its arguments (weights included),
    outputs and temporaries, less what outputs reuse of donated arguments."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def device_peak_bytes() -> tuple[int | None, str]:
    """The device's own peak memory since this process started (never reset: for one
    program's peak, run it in a fresh process, as ``in_fresh_process`` does)."""
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return None, f"n/a: the {device.platform} device reports no memory statistics"
    return int(stats["peak_bytes_in_use"]), ""


def reports_peak_memory() -> bool:
    return device_peak_bytes()[0] is not None


class EnergyMeter:
    """Energy drawn by GPU 0 between ``start`` and ``stop``, from NVML's energy counter.

    NVML comes from the optional ``nvidia-ml-py`` package (``pip install 'vqvae[gpu]'``).
    """

    def __init__(self):
        self.handle, self.note, self._start = None, "", None
        device = jax.devices()[0]
        if device.platform != "gpu":
            self.note = f"n/a: the {device.platform} device reports no power"
            return
        try:
            import pynvml
        except ImportError:
            self.note = "n/a: NVML missing (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.local_hardware_id or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except pynvml.NVMLError as e:
            self.handle, self.note = None, f"n/a: NVML has no energy counter here ({e})"
        self._nvml = pynvml

    def start(self) -> None:
        if self.handle is not None:
            self._start = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def stop(self) -> float | None:
        """Joules since ``start`` (None where there is no counter; see ``note``)."""
        if self.handle is None or self._start is None:
            return None
        millijoules = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._start
        return millijoules / 1e3


def energy_per_item(fn, items_per_call: int, seconds: float = 2.0) -> tuple[float | None, str]:
    """Joules per item of ``fn()`` (which must block until done), over about ``seconds``."""
    meter = EnergyMeter()
    if meter.handle is None:
        return None, meter.note
    calls, t0 = 0, time.perf_counter()
    meter.start()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        fn()
        calls += 1
    joules = meter.stop()
    return joules / (calls * items_per_call), ""


def in_fresh_process(argv: list[str], timeout: int = 1800) -> dict:
    """Run ``python argv...`` and return the JSON object on the last line of its output.

    A fresh process starts with the device's peak-memory counter at zero.
    """
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{' '.join(argv)} failed: {tail}")
    return json.loads(lines[-1])
