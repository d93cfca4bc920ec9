"""System sampling on this machine (host row; GPU rows only where NVML sees GPUs) and the monitor thread."""

import threading
import time

import psutil
import pynvml

from nlmm.store import create_run, get_engine, system_samples
from nlmm.train.sysmon import NO_GPU_NOTE, SystemMonitor, gpu_available, sample_system


def _nvml_gpu_count() -> int:
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        return 0


def test_sample_has_sane_host_row_and_one_row_per_gpu():
    rows = sample_system()
    host = [r for r in rows if r["device_index"] is None]
    gpus = [r for r in rows if r["device_index"] is not None]
    assert len(host) == 1
    assert 0.0 <= host[0]["cpu_percent"] <= 100.0
    assert host[0]["ram_total"] == psutil.virtual_memory().total
    assert 0 < host[0]["ram_used"] <= host[0]["ram_total"]
    assert abs(host[0]["time"] - time.time()) < 5
    assert gpu_available() == (_nvml_gpu_count() > 0)
    assert [g["device_index"] for g in gpus] == list(range(_nvml_gpu_count()))
    for gpu in gpus:
        assert 0 <= gpu["gpu_mem_used"] <= gpu["gpu_mem_total"]
        assert gpu["gpu_util"] is None or 0 <= gpu["gpu_util"] <= 100


def test_monitor_writes_samples_and_stops_promptly(tmp_path):
    engine = get_engine(f"sqlite:///{tmp_path / 'nlmm.db'}")
    run = create_run("monitored", {}, "", "cpu", 1, 1, engine=engine)
    monitor = SystemMonitor(run.id, interval_s=0.5, engine=engine)
    assert monitor.note == (None if gpu_available() else NO_GPU_NOTE)
    monitor.start()
    busy_until = time.monotonic() + 1.6
    while time.monotonic() < busy_until:  # keep a core busy so every sample sees CPU use
        sum(range(1000))
    began = time.monotonic()
    monitor.stop()
    assert time.monotonic() - began < 1.0
    assert not any(t.name == "nlmm-sysmon" and t.is_alive() for t in threading.enumerate())
    samples = system_samples(run.id, engine=engine)
    host = [s for s in samples if s.device_index is None]
    assert len(host) >= 2 and monitor.last_error is None
    assert all(s.run_id == run.id and s.ram_total == psutil.virtual_memory().total for s in host)
    assert all(0.0 < s.cpu_percent <= 100.0 for s in host)
    count = len(samples)
    time.sleep(0.7)
    assert len(system_samples(run.id, engine=engine)) == count


def test_the_test_device_is_sampled_and_recorded(device, tmp_path):
    """On --device cuda, NVML sees the GPU torch trains on and the monitor records its rows
    (what the dash's GPU panel shows); on the CPU the host row is recorded alone or beside them."""
    import torch

    engine = get_engine(f"sqlite:///{tmp_path / 'nlmm.db'}")
    run = create_run("device", {}, "", device.type, 1, 1, engine=engine)
    with SystemMonitor(run.id, interval_s=0.2, engine=engine) as monitor:
        time.sleep(1.5)
    samples = system_samples(run.id, engine=engine)
    assert monitor.last_error is None and any(s.device_index is None for s in samples)
    if device.type == "cuda":
        assert gpu_available() and monitor.note is None
        gpus = [s for s in samples if s.device_index is not None]
        assert {s.device_index for s in gpus} >= set(range(torch.cuda.device_count()))
        assert all(0 < s.gpu_mem_used <= s.gpu_mem_total for s in gpus)
        assert all(s.gpu_util is None or 0 <= s.gpu_util <= 100 for s in gpus)
