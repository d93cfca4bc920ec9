"""GPU (NVML) and host (psutil) sampling, and a thread that records samples in the store.

Rows are dicts of `SystemSample` columns: one per GPU (device_index = NVML index, which ignores
CUDA_VISIBLE_DEVICES) and one host row (device_index None). Without a GPU or a working NVML
driver only the host row is produced; sampling never raises for missing hardware.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psutil
import pynvml
from sqlalchemy import Engine

from nlmm.store.queries import add_system_samples

log = logging.getLogger(__name__)

NO_GPU_NOTE = "no GPU found: host stats only"

_nvml_lock = threading.Lock()
_nvml_ready: bool | None = None


def _nvml() -> bool:
    """Initialise NVML once per process; False when there is no driver or no GPU."""
    global _nvml_ready
    with _nvml_lock:
        if _nvml_ready is None:
            try:
                pynvml.nvmlInit()
                _nvml_ready = pynvml.nvmlDeviceGetCount() > 0
            except pynvml.NVMLError:
                _nvml_ready = False
        return _nvml_ready


def gpu_available() -> bool:
    """Whether NVML sees at least one GPU."""
    return _nvml()


def _read(getter: Any, *args: Any) -> Any:
    # Each reading may be unsupported on its own (power on some boards, utilisation under MIG).
    try:
        return getter(*args)
    except pynvml.NVMLError:
        return None


def _gpu_rows(now: float) -> list[dict[str, Any]]:
    rows = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        util = _read(pynvml.nvmlDeviceGetUtilizationRates, handle)
        memory = _read(pynvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = _read(pynvml.nvmlDeviceGetPowerUsage, handle)
        temperature = _read(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
        rows.append({
            "time": now,
            "device_index": index,
            "gpu_util": None if util is None else float(util.gpu),
            "gpu_mem_used": None if memory is None else int(memory.used),
            "gpu_mem_total": None if memory is None else int(memory.total),
            "power_w": None if power_mw is None else power_mw / 1000.0,
            "temperature_c": None if temperature is None else float(temperature),
        })
    return rows


def sample_system() -> list[dict[str, Any]]:
    """One row per GPU, then the host row (RAM in bytes; CPU percent of the whole machine since
    this thread's previous call, 0.0 on a thread's first call)."""
    now = time.time()
    rows = []
    if _nvml():
        try:
            rows = _gpu_rows(now)
        except pynvml.NVMLError as exc:
            log.warning("reading the GPUs failed (%s); recording host stats only", exc)
    memory = psutil.virtual_memory()
    rows.append({"time": now, "device_index": None, "cpu_percent": psutil.cpu_percent(interval=None),
                 "ram_used": int(memory.total - memory.available), "ram_total": int(memory.total)})
    return rows


class SystemMonitor:
    """A daemon thread that writes `sample_system()` rows for a run every `interval_s` seconds."""

    def __init__(self, run_id: int | None, interval_s: float = 5.0,
                 engine: Engine | None = None) -> None:
        self.run_id = run_id
        self.interval_s = interval_s
        self.engine = engine
        self.note: str | None = None if gpu_available() else NO_GPU_NOTE
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="nlmm-sysmon", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # psutil measures CPU between two calls of the same thread; the first only sets the start.
        psutil.cpu_percent(interval=None)
        # the first sample comes after a second, so even a short run has one
        delay = min(1.0, self.interval_s)
        while not self._stop.wait(delay):
            delay = self.interval_s
            rows = sample_system()
            for row in rows:
                row["run_id"] = self.run_id
            try:
                add_system_samples(rows, engine=self.engine)
            except Exception as exc:  # noqa: BLE001 - monitoring must never take training down
                if self.last_error is None:
                    log.warning("recording system samples failed: %s", exc)
                self.last_error = str(exc)

    def stop(self) -> None:
        """Stop sampling; returns once the thread has finished."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> SystemMonitor:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
