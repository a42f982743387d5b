"""Buffers reused across training steps (:class:`ReusedBuffers`): large per-step tensors that
would otherwise be fresh memory every step, whose first writes cost the kernel's page faults."""
from __future__ import annotations

import math
import threading

import torch


class ReusedBuffers:
    """Buffers handed out again once nothing else holds them: the rows a training step gathers and
    the states its fused towers keep for the backward (15 MB each per tower at 704 items of 7 x 768
    rows) would otherwise be fresh memory every step, whose first writes cost the kernel's page
    faults (the ``page faults`` column of ``results/speed/step_speed.md``).

    A buffer is free when its storage has no reference but the pool's: the autograd graph that
    saved it has run its backward or been dropped (checked with the storage's reference count,
    ``torch._C._storage_Use_Count``; a torch without it allocates every time). At most ``keep``
    buffers are kept, the most recently made; dropping one from the pool is always safe."""

    def __init__(self, keep: int = 4):
        self.keep, self.items = keep, []  # [(flat buffer, its reference count when only the pool holds it)]
        self.lock = threading.Lock()

    def __getstate__(self) -> dict:  # a copy of the model starts with an empty pool (and its own lock)
        return {"keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"])

    @staticmethod
    def _refs(t: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def take(self, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        if not hasattr(torch._C, "_storage_Use_Count"):
            return torch.empty(shape, dtype=dtype, device=device)
        with self.lock:
            free = [t for t, base in self.items if t.dtype == dtype and t.device == torch.device(device)
                    and t.numel() >= numel and self._refs(t) == base]
            if free:
                return min(free, key=torch.Tensor.numel)[:numel].view(shape)
            t = torch.empty(numel, dtype=dtype, device=device)
            self.items = (self.items + [(t, self._refs(t))])[-self.keep:]
            return t[:numel].view(shape)
