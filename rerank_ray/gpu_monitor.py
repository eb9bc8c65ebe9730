"""A scoring actor's GPU, sampled: utilisation and memory by NVML in a thread, peak by torch.

NVML comes from ``nvidia-ml-py`` (module ``pynvml``), which Ray's CUDA images carry. Without
it, or on a CPU, ``status`` says why there are no samples and the run report says so.
"""

from __future__ import annotations

import threading
import time

SAMPLE_INTERVAL_S = 0.5


class GpuMonitor:
    """Samples one CUDA device every ``interval`` seconds until the process ends."""

    def __init__(self, device, interval: float = SAMPLE_INTERVAL_S) -> None:
        """``device``: the actor's ``torch.device``; a CPU device gives no samples."""
        self.device = device
        self.name: str | None = None
        self.status = "ok"
        self._samples: list[list[float]] = []
        self._lock = threading.Lock()
        if device.type != "cuda":
            self.status = "no GPU: the scoring actors ran on CPU"
            return
        import torch

        self.name = torch.cuda.get_device_name(device)
        handle = self._nvml_handle(torch.cuda.get_device_properties(device))
        if handle is None:
            return
        thread = threading.Thread(
            target=self._sample, args=(handle, interval), name="gpu-monitor", daemon=True
        )
        thread.start()

    def _nvml_handle(self, props):
        try:
            import pynvml
        except ImportError:
            self.status = (
                "NVML is not available: the module pynvml is not installed here "
                "(pip install nvidia-ml-py)"
            )
            return None
        try:
            pynvml.nvmlInit()
            # NVML numbers every GPU of the machine; CUDA only the visible ones: the UUID
            # names the same device in both.
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
        except pynvml.NVMLError as err:
            self.status = f"NVML failed: {err}"
            return None

    def _sample(self, handle, interval: float) -> None:
        import pynvml

        while True:
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                used = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            except pynvml.NVMLError as err:
                self.status = f"NVML stopped answering: {err}"
                return
            with self._lock:
                self._samples.append([time.time(), float(util), round(used, 1)])
            time.sleep(interval)

    def drain(self) -> list[list[float]]:
        """The samples ``[time, utilisation %, memory used MiB]`` taken since the last drain."""
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def peak_memory_mib(self) -> float | None:
        """The most memory torch has held on the device so far (its allocator's peak)."""
        if self.device.type != "cuda":
            return None
        import torch

        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
