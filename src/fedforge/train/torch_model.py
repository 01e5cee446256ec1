"""Adapter between a ``torch.nn.Module`` and framework-neutral ``Params``.

**Frozen parameters stay local.** A parameter with ``requires_grad = False`` (a frozen base
under LoRA adapters, a frozen feature extractor) is never exchanged: it is not in
``names``, records, checkpoints' model state or the wire, and every process builds it from
its own copy (the handshake compares a SHA-256 of it: :func:`frozen_digest`). Buffers of a
module whose parameters are all frozen stay local too. A model without frozen parameters
exchanges its whole floating state, as before.

The server may still move a frozen parameter: a broadcast entry ``frozen/<name>``
(:data:`FROZEN`) is an offset added to that parameter's local value for the task
(:meth:`TorchModel.set_frozen_offsets`; exact LoRA folds its residual into the base so).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from fedforge.core.params import Params

FROZEN = "frozen/"  # broadcast entries: offsets of frozen parameters, by parameter name


def frozen_names(module: torch.nn.Module) -> set[str]:
    """The ``state_dict`` names that stay local: frozen parameters, and the buffers of
    modules that own parameters, all frozen (none when no parameter is frozen)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    frozen = {n for n, p in params.items() if not p.requires_grad}
    if not frozen:
        return set()
    owners_trainable: dict[str, bool] = {}
    for name, p in params.items():
        owner = name.rpartition(".")[0]
        owners_trainable[owner] = owners_trainable.get(owner, False) or p.requires_grad
    out = set(frozen)
    state = module.state_dict(keep_vars=True)  # (non-persistent buffers are not state)
    for name, _ in module.named_buffers(remove_duplicate=False):
        owner = name.rpartition(".")[0]
        if name in state and not owners_trainable.get(owner, False):
            out.add(name)
    return out & set(state)


def trainable_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters local training updates (``requires_grad``), in order."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def frozen_digest(module: torch.nn.Module) -> str | None:
    """SHA-256 (hex) of the frozen state: every local tensor's name, dtype, shape and bytes,
    in name order; None when nothing is frozen. Equal digests: the same frozen weights."""
    local = frozen_names(module)
    if not local:
        return None
    digest = hashlib.sha256()
    state = module.state_dict(keep_vars=True)
    for name in sorted(local):
        data = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TorchModel:
    """Reads and writes a module's exchanged floating-point state as named NumPy arrays.

    Covers parameters and floating buffers (e.g. batch-norm statistics), in ``state_dict``
    order, but frozen state (see the module docstring). Integer buffers (such as
    ``num_batches_tracked``) stay local.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        local = frozen_names(module)
        state = module.state_dict(keep_vars=True)
        self._tensors = {
            name: tensor
            for name, tensor in state.items()
            if tensor.is_floating_point() and name not in local
        }
        self._frozen = {name: state[name] for name in sorted(local)}
        self._originals: dict[str, torch.Tensor] = {}  # values before an offset, by name

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

    def set_frozen_offsets(self, shared: Mapping[str, np.ndarray]) -> None:
        """Frozen parameter ``n`` becomes its local value plus ``shared["frozen/" + n]``
        (its local value where no offset is given). An offset naming no frozen tensor, or of
        another shape, is refused."""
        offsets = {k[len(FROZEN) :]: v for k, v in shared.items() if k.startswith(FROZEN)}
        unknown = sorted(set(offsets) - set(self._frozen))
        if unknown:
            raise ValueError(f"offsets for tensors that are not frozen here: {unknown[:3]}")
        with torch.no_grad():
            for name, original in self._originals.items():
                if name not in offsets:
                    self._frozen[name].copy_(original)
            for name, offset in offsets.items():
                tensor = self._frozen[name]
                if tuple(offset.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"offset of {name} has shape {list(offset.shape)}, the tensor "
                        f"{list(tensor.shape)}"
                    )
                if name not in self._originals:
                    self._originals[name] = tensor.detach().clone()
                value = torch.from_numpy(np.ascontiguousarray(offset)).to(tensor.dtype)
                tensor.copy_(self._originals[name] + value)
        for name in [n for n in self._originals if n not in offsets]:
            del self._originals[name]
