"""Fused batched kernels for multilayer perceptrons (chains of Linear and ReLU).

For an MLP the weight gradient of layer l is ``dZ_l^T H_{l-1}``: batched over a stack of
clients it is one ``bmm`` per layer. Plain SGD applies it in place with one ``baddbmm_`` per
layer, so the gradient is never stored (:func:`fused_sgd_step`); any other program gets the
gradients (:func:`fused_grads`) and runs its own chain (:meth:`LocalProgram.apply`). The math
is exactly that of the program's masked mean cross-entropy; both are tested equal to the
generic ``vmap`` path and to the sequential runtime. A stateless program's first steps run
without per-client weights at all (:mod:`fedforge.train.cohort_lowrank`); these kernels
continue from the weights it materializes.

The structure is read from a ``torch.fx`` trace, so it does not matter whether the network is
an ``nn.Sequential`` or a custom module whose ``forward`` chains its layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class DenseLayer:
    weight: str
    bias: str | None
    relu: bool


def _is_relu(node: fx.Node, root: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(root.get_submodule(str(node.target)), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def mlp_structure(module: nn.Module) -> list[DenseLayer] | None:
    """The dense layers of ``module`` if its forward is a chain Linear, [ReLU], ..., Linear
    using every trainable parameter; otherwise None."""
    try:
        traced = fx.symbolic_trace(module)
    except Exception:
        return None
    layers: list[DenseLayer] = []
    current: fx.Node | None = None
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                return None
            current = node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                return None
            break
        if not node.args or node.args[0] is not current:
            return None
        if any(isinstance(a, fx.Node) for a in node.args[1:]) or any(
            isinstance(v, fx.Node) for v in node.kwargs.values()
        ):
            return None
        if node.op == "call_module" and isinstance(
            traced.get_submodule(str(node.target)), nn.Linear
        ):
            linear = traced.get_submodule(str(node.target))
            bias = f"{node.target}.bias" if linear.bias is not None else None
            layers.append(DenseLayer(f"{node.target}.weight", bias, relu=False))
        elif _is_relu(node, traced) and layers and not layers[-1].relu:
            layers[-1] = DenseLayer(layers[-1].weight, layers[-1].bias, relu=True)
        else:
            return None
        current = node
    if not layers or layers[-1].relu:
        return None
    used = {layer.weight for layer in layers} | {layer.bias for layer in layers if layer.bias}
    if used != {name for name, _ in module.named_parameters()}:
        return None
    return layers


def _forward(
    layers: list[DenseLayer],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Inputs and pre-activations per layer, d(loss)/d(logits), and each client's loss."""
    inputs, pre_activations = [], []
    h = x
    for layer in layers:
        inputs.append(h)
        w = params[layer.weight]
        if layer.bias:
            z = torch.baddbmm(params[layer.bias].unsqueeze(1), h, w.transpose(1, 2))
        else:
            z = torch.bmm(h, w.transpose(1, 2))
        pre_activations.append(z)
        h = torch.relu(z) if layer.relu else z
    loss, grad = loss_and_grad(h, y, mask)
    return inputs, pre_activations, grad, loss


def loss_and_grad(
    logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's masked mean cross-entropy over its batch, and its gradient with
    respect to the ``(clients, batch, classes)`` logits."""
    count = mask.sum(dim=1)
    log_probs = F.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss = (nll * mask).sum(dim=1) / count
    grad = log_probs.exp_()
    grad.scatter_add_(-1, y.unsqueeze(-1), -torch.ones_like(nll).unsqueeze(-1))
    grad.mul_((mask / count.unsqueeze(1)).unsqueeze(-1))
    return loss, grad


Affine = dict[str, tuple[float, torch.Tensor | None]]


def _gradients(
    layers: list[DenseLayer],
    params: dict[str, torch.Tensor],
    inputs: list[torch.Tensor],
    pre_activations: list[torch.Tensor],
    grad: torch.Tensor,
    out: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Back-propagate and write every client's gradients into the ``out`` buffers."""
    for index in range(len(layers) - 1, -1, -1):
        layer, h_in = layers[index], inputs[index]
        torch.bmm(grad.transpose(1, 2), h_in, out=out[layer.weight])
        if layer.bias:
            torch.sum(grad, dim=1, out=out[layer.bias])
        if index > 0:
            grad = _below(layers, index, params[layer.weight], grad, pre_activations)
    return {n: out[n] for n in out}


def _below(
    layers: list[DenseLayer],
    index: int,
    w: torch.Tensor,
    grad: torch.Tensor,
    pre_activations: list[torch.Tensor],
) -> torch.Tensor:
    """The gradient with respect to layer ``index``'s input (through the *old* weights)."""
    below = torch.bmm(grad, w)
    if layers[index - 1].relu:
        below.mul_(pre_activations[index - 1] > 0)
    return below


def _update(
    layers: list[DenseLayer],
    params: dict[str, torch.Tensor],
    inputs: list[torch.Tensor],
    pre_activations: list[torch.Tensor],
    grad: torch.Tensor,
    lr: float,
    affine: Affine | None,
) -> None:
    """Back-propagate and take the SGD step ``w <- (1 - lr alpha) w - lr (grad + offset)`` in
    place (``affine`` per parameter: ``alpha`` and an ``offset`` tensor; plain SGD without
    it), the decay fused into ``baddbmm``."""
    for index in range(len(layers) - 1, -1, -1):
        layer, h_in = layers[index], inputs[index]
        w = params[layer.weight]
        below = _below(layers, index, w, grad, pre_activations) if index > 0 else None
        decay, offset = affine[layer.weight] if affine else (0.0, None)
        w.baddbmm_(grad.transpose(1, 2), h_in, beta=1.0 - lr * decay, alpha=-lr)
        if offset is not None:
            w.sub_(offset, alpha=lr)
        if layer.bias:
            b = params[layer.bias]
            decay, offset = affine[layer.bias] if affine else (0.0, None)
            if decay:
                b.mul_(1.0 - lr * decay)
            b.sub_(grad.sum(dim=1), alpha=lr)
            if offset is not None:
                b.sub_(offset, alpha=lr)
        if below is not None:
            grad = below


def fused_sgd_step(
    layers: list[DenseLayer],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    lr: float,
    affine: Affine | None = None,
) -> torch.Tensor:
    """One SGD step for every client of the stack, in place; each client's loss.

    ``params`` hold stacked tensors (leading client axis), ``x`` is (clients, batch, in),
    ``mask`` marks the real examples of short batches; ``affine`` adds, per parameter, a
    gradient term ``alpha * w + offset`` (weight decay, a proximal term, a control-variate
    correction)."""
    inputs, pre, grad, loss = _forward(layers, params, x, y, mask)
    _update(layers, params, inputs, pre, grad, lr, affine)
    return loss


def fused_grads(
    layers: list[DenseLayer],
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    out: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each client's loss gradient (stacked, written into the ``out`` buffers) and loss."""
    inputs, pre, grad, loss = _forward(layers, params, x, y, mask)
    return _gradients(layers, params, inputs, pre, grad, out), loss
