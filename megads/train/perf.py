"""Throughput figures of the trainer's log: MFU against the device's peak, and this process's memory.

MFU (model FLOPs utilisation, PaLM's definition as Megatron-Core and torchtitan report it): the
model's training FLOPs per token (forward x 3, no recomputation counted:
`megads.plan.estimate.model_flops_per_token`) times tokens per second, over the peak of every
rank together. The peak of a GPU is the dense BF16 tensor-core figure of its datasheet (table
below; fp32 runs use the TF32 figure, half of it); an unknown GPU, or a CPU, is measured at start:
the best of a few fp32 matrix products on this process's threads. On CPU ranks that share cores,
the measured peak is per rank as the rank sees it at start, so the figure is indicative only.
"""

from __future__ import annotations

import os
import resource
import time

import torch

# dense BF16 tensor-core peak (FLOP/s) by a substring of the device name; NVIDIA datasheets
GPU_BF16_PEAK = {
    "GB200": 2.5e15, "B200": 2.25e15, "H200": 989e12, "H100": 989e12, "H800": 989e12, "H20": 148e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12,
}


def measured_matmul_flops(device: torch.device, *, n: int = 1024, reps: int = 4) -> float:
    """The best fp32 matrix-product rate of `device` over `reps` products of n x n (FLOP/s)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(device: torch.device, *, bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s of one rank's device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return (peak if bf16 else peak / 2), f"{name} datasheet ({'BF16' if bf16 else 'TF32'} dense)"
        return measured_matmul_flops(device, n=4096), f"{name}: measured fp32 matmul"
    threads = torch.get_num_threads()
    return measured_matmul_flops(device), f"CPU: measured fp32 matmul on {threads} thread(s)"


def rss_bytes() -> int:
    """This process's resident set size now (peak when /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_figures(device: torch.device) -> dict[str, float]:
    """The memory keys of the step log: GiB of CUDA max allocated (and reserved) or CPU RSS."""
    out = {"memory/rss_gib": rss_bytes() / 2**30}
    if device.type == "cuda":
        out["memory/cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["memory/cuda_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out
