"""Adapter between a ``torch.nn.Module`` and framework-neutral ``Params``."""

from __future__ import annotations

import numpy as np
import torch

from fedforge.core.params import Params


class TorchModel:
    """Reads and writes a module's floating-point state as named NumPy arrays.

    Covers parameters and floating buffers (e.g. batch-norm statistics), in ``state_dict``
    order. Integer buffers (such as ``num_batches_tracked``) stay local.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._tensors = {
            name: tensor
            for name, tensor in module.state_dict(keep_vars=True).items()
            if tensor.is_floating_point()
        }

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's floating-point state as tensors (the module's own storage)."""
        return {name: t.detach() for name, t in self._tensors.items()}

    def get_params(self) -> Params:
        return {name: t.detach().cpu().numpy().copy() for name, t in self._tensors.items()}

    def set_params(self, params: Params) -> None:
        with torch.no_grad():
            for name, tensor in self._tensors.items():
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(params[name])))

    def share_params(self, params: Params) -> None:
        """Make the module's floating-point state views of ``params`` (no copy): for a model
        that is only read (the server's evaluation) of arrays never written in place. Its
        previous storage is released."""
        for name, tensor in self._tensors.items():
            array = np.asarray(params[name])
            if array.shape != tuple(tensor.shape) or array.dtype != tensor.detach().numpy().dtype:
                raise ValueError(f"{name}: {array.shape} {array.dtype} does not fit the model")
            if not (array.flags.c_contiguous and array.flags.writeable):
                array = np.array(array)  # (torch shares writeable, contiguous memory only)
            tensor.data = torch.from_numpy(array)
