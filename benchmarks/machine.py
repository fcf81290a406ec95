"""What machine a result was measured on, so a JSON file from elsewhere is never mistaken for this one."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(device: torch.device) -> dict[str, object]:
    """CPU, cores, load, accelerator and the versions of everything on the measured path."""
    import onnxruntime as ort

    info: dict[str, object] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__, "onnxruntime": ort.__version__,
        "ort_providers_available": ort.get_available_providers(),
        "fastapi": version("fastapi"), "uvicorn": version("uvicorn"), "litserve": version("litserve"),
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def summary_line(info: dict[str, object]) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    return (f"{info['cpu']}, {info['cores']} cores{gpu}; torch {info['torch']}, onnxruntime {info['onnxruntime']}, "
            f"litserve {info['litserve'] or 'not installed'}; load average {info['load_average_at_start']}")


def save_results(results: dict[str, object], path: Path | None) -> None:
    """Write a benchmark's results as JSON (nothing without a path)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
