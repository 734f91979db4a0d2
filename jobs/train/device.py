"""What the recipe asks of the device it computes on: collectives on the engine's device, and this process's peak
memory."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


class DeviceCollectives:
    """Every collective the recipe itself issues, on one device: the engine's. NCCL (`use_gpu: true`) refuses CPU
    tensors, gloo refuses CUDA ones, so a tensor on another device is refused here, naming both, before it reaches
    the process group.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def _check(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != self.device:
            raise RuntimeError(f"collective on a tensor on {tensor.device}; the engine computes on {self.device}")
        return tensor

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(self._check(tensor))
        return tensor.tolist()

    def max(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(self._check(tensor), op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(
                device_ids=[self.device.index if self.device.index is not None else torch.cuda.current_device()]
            )
        else:
            dist.barrier()


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: CUDA memory allocated on a GPU, the resident set's high-water mark (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0
