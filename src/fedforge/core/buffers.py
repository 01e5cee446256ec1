"""Large scratch tensors that are cheap to touch.

A fresh multi-megabyte ``torch.empty`` on the CPU costs a page fault per 4 KiB page the first
time it is written (measured: 30 ms to allocate and fill 80 MB, 2 ms to fill it again). NumPy
allocates large arrays on transparent huge pages, 512 times fewer faults (5 ms), so large CPU
buffers are NumPy arrays viewed as tensors; other devices use torch's allocator.
"""

from __future__ import annotations

import numpy as np
import torch

LARGE = 1 << 20  # bytes from which NumPy's allocator is used


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor of ``shape`` on ``device``."""
    count = int(np.prod(shape, dtype=np.int64))
    if device.type != "cpu" or count * dtype.itemsize < LARGE:
        return torch.empty(shape, dtype=dtype, device=device)
    array = np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    return torch.from_numpy(array)
