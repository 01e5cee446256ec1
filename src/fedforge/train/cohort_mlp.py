"""Fused batched SGD step for multilayer perceptrons (Linear / ReLU stacks).

The generic cohort path materializes every client's gradient and then applies it. For an MLP
the weight gradient of layer l is ``dZ_l^T H_{l-1}``, so plain SGD can apply it in place with
one ``baddbmm_`` per layer: the gradient is never stored, which halves the memory traffic of
the step. The math is exactly that of ``LocalSGD`` on ``F.cross_entropy`` (masked mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DenseLayer:
    weight: str
    bias: str | None
    relu: bool


def mlp_structure(module: nn.Module) -> list[DenseLayer] | None:
    """The layers of ``module`` if it is ``Sequential(Linear, [ReLU], ..., Linear)``."""
    if not isinstance(module, nn.Sequential):
        return None
    layers: list[DenseLayer] = []
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        if isinstance(child, nn.Linear):
            bias = f"{name}.bias" if child.bias is not None else None
            layers.append(DenseLayer(f"{name}.weight", bias, relu=False))
        elif isinstance(child, nn.ReLU) and layers and not layers[-1].relu and i > 0:
            layers[-1] = DenseLayer(layers[-1].weight, layers[-1].bias, relu=True)
        else:
            return None
    if not layers or layers[-1].relu:
        return None
    return layers


def fused_sgd_step(
    layers: list[DenseLayer],
    params: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    lr: float,
    momentum_factor: float,
    weight_decay: float,
) -> torch.Tensor:
    """One SGD step for every client in the stack, in place; return each client's loss.

    ``params`` hold stacked tensors (leading client axis), ``x`` is (clients, batch, in),
    ``mask`` marks real examples of short batches.
    """
    count = mask.sum(dim=1)
    inputs, pre_activations = [], []
    h = x
    for layer in layers:
        inputs.append(h)
        w = params[layer.weight]
        z = (
            torch.baddbmm(params[layer.bias].unsqueeze(1), h, w.transpose(1, 2))
            if layer.bias
            else torch.bmm(h, w.transpose(1, 2))
        )
        pre_activations.append(z)
        h = torch.relu(z) if layer.relu else z
    log_probs = F.log_softmax(h, dim=-1)
    nll = -log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss = (nll * mask).sum(dim=1) / count
    # d(loss)/d(logits) of the masked mean cross-entropy.
    grad = log_probs.exp_()
    grad.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(nll).unsqueeze(-1))
    grad.mul_((mask / count.unsqueeze(1)).unsqueeze(-1))
    plain = momentum_factor == 0.0 and weight_decay == 0.0
    for index in range(len(layers) - 1, -1, -1):
        layer, h_in = layers[index], inputs[index]
        w = params[layer.weight]
        # Propagate through the *old* weights before updating them.
        below = torch.bmm(grad, w) if index > 0 else None
        if plain:
            w.baddbmm_(grad.transpose(1, 2), h_in, alpha=-lr)
            if layer.bias:
                params[layer.bias].sub_(grad.sum(dim=1), alpha=lr)
        else:
            _apply(
                w,
                torch.bmm(grad.transpose(1, 2), h_in),
                momentum.get(layer.weight),
                lr,
                momentum_factor,
                weight_decay,
            )
            if layer.bias:
                _apply(
                    params[layer.bias],
                    grad.sum(dim=1),
                    momentum.get(layer.bias),
                    lr,
                    momentum_factor,
                    weight_decay,
                )
        if below is not None:
            if layers[index - 1].relu:
                below.mul_(pre_activations[index - 1] > 0)
            grad = below
    return loss


def _apply(
    param: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    lr: float,
    momentum_factor: float,
    weight_decay: float,
) -> None:
    """``torch.optim.SGD``'s update (dampening 0, no Nesterov) on a stacked tensor."""
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    if momentum_factor and buffer is not None:
        buffer.mul_(momentum_factor).add_(grad)
        grad = buffer
    param.sub_(grad, alpha=lr)
