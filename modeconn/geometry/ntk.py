"""The empirical neural tangent kernel and how it moves during training (Fort et al. 2020).

For a network f(x; θ) with K outputs, the empirical NTK on inputs x_1..x_N is
``Θ[i, j, a, b] = Σ_p ∂f_a(x_i)/∂θ_p · ∂f_b(x_j)/∂θ_p`` (Jacot et al. 2018),
i.e. ``J Jᵀ`` of the Jacobian ``J`` of the outputs with respect to all
trainable parameters. Three variants (``kind``):

* ``"full"``: ``Θ`` as ``[N, N, K, K]``;
* ``"trace"``: ``Σ_a Θ[i, j, a, a]``, ``[N, N]`` (the trace over outputs, what
  Fort et al. track);
* ``"sum"``: the NTK of the logit sum ``Σ_a f_a``, ``Σ_ab Θ[i, j, a, b]``,
  ``[N, N]``; its Jacobian is ``[N, P]`` instead of ``[N, K, P]``, the cheap
  variant for many classes.

Jacobians come from ``torch.func`` (``vmap`` over samples of ``jacrev`` of a
``functional_call``), ``chunk_size`` samples at a time, so the peak memory of
the Jacobian computation is bounded by the chunk; the kernel is accumulated
per pair of chunks from the chunks' flattened Jacobians (kept, ``N·K·P``
numbers, or ``N·P`` for ``"sum"``). The network is evaluated in eval mode
(dropout off, BatchNorm with its running statistics: a fixed function of θ).

Measures between kernels (Fort et al. 2020, Sec. 4):

* kernel distance ``S(K₁, K₂) = 1 − ⟨K₁, K₂⟩_F / (‖K₁‖_F ‖K₂‖_F)``;
* kernel velocity: the distance between the kernels of two consecutive
  checkpoints divided by the time between them (here per epoch);
* kernel–label alignment ``⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F)`` with one-hot
  labels Y (Cristianini et al. 2002; Baratin et al. 2021 track it in training).

:class:`NTKTracker` records them at the end of every epoch of
:func:`~modeconn.training.loop.train_model` (its ``epoch_fields``).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["NTK_KINDS", "empirical_ntk", "kernel_distance", "kernel_velocity", "kernel_alignment", "NTKTracker"]

NTK_KINDS = ("full", "trace", "sum")


def _jacobian(model: nn.Module, params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor],
              x: torch.Tensor, summed: bool) -> torch.Tensor:
    """Flattened per-sample Jacobians ``[B, K, P]`` (``K = 1`` for the logit sum) of ``model`` at ``params``."""
    def out(p, xi):
        """The outputs of one sample, flattened (summed to one with ``summed``)."""
        y = functional_call(model, (p, buffers), (xi.unsqueeze(0),)).reshape(-1)
        return y.sum().unsqueeze(0) if summed else y

    jac = vmap(jacrev(out), in_dims=(None, 0))(params, x)
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)


def empirical_ntk(model: nn.Module, inputs: torch.Tensor, kind: str = "trace", chunk_size: int = 32
                  ) -> torch.Tensor:
    """The empirical NTK of ``model`` (all trainable parameters) on ``inputs`` (a batch, ``[N, ...]``).

    Args:
        model: the network; evaluated in eval mode (its mode is restored after).
        inputs: the N inputs, as the model takes them (transforms already applied).
        kind: ``"full"`` → ``[N, N, K, K]``; ``"trace"`` or ``"sum"`` → ``[N, N]`` (module docstring).
        chunk_size: samples per ``vmap`` of the Jacobian (bounds its memory).

    Returns:
        The kernel (float, on the parameters' device), symmetric positive semi-definite.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> k = empirical_ntk(net, x, kind="full")
        >>> torch.allclose(k[:, :, 0, 0], x @ x.T + 1, atol=1e-5), bool(k[:, :, 0, 1].abs().max() < 1e-6)
        (True, True)
    """
    if kind not in NTK_KINDS:
        raise ValueError(f"unknown NTK kind {kind!r}; use one of {NTK_KINDS}")
    if isinstance(chunk_size, bool) or int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size}")
    if inputs.dim() < 1 or len(inputs) == 0:
        raise ValueError(f"inputs must be a non-empty batch [N, ...], got shape {tuple(inputs.shape)}")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters: its NTK is zero")
    buffers = dict(model.named_buffers())
    device = next(iter(params.values())).device
    was_training = model.training
    model.eval()
    try:
        jacs = [_jacobian(model, params, buffers, c.to(device), kind == "sum")
                for c in inputs.split(int(chunk_size))]
    finally:
        model.train(was_training)
    rows = []
    for ji in jacs:  # one block row of chunk pairs at a time
        if kind == "full":
            rows.append(torch.cat([torch.einsum("iap,jbp->ijab", ji, jj) for jj in jacs], dim=1))
        else:
            rows.append(torch.cat([torch.einsum("iap,jap->ij", ji, jj) for jj in jacs], dim=1))
    return torch.cat(rows, dim=0)


def _check_pair(k1: torch.Tensor, k2: torch.Tensor) -> None:
    """ValueError when two kernels cannot be compared."""
    if k1.shape != k2.shape:
        raise ValueError(f"kernels of different shapes {tuple(k1.shape)} and {tuple(k2.shape)}: compute both on "
                         "the same inputs with the same kind")


def kernel_distance(k1: torch.Tensor, k2: torch.Tensor) -> float:
    """``1 − ⟨K₁, K₂⟩_F / (‖K₁‖_F ‖K₂‖_F)`` (Fort et al. 2020): 0 for proportional kernels, in [0, 2].

    Computed in float64. Example: ``kernel_distance(k, 3 * k) == 0``.
    """
    _check_pair(k1, k2)
    a, b = k1.double().reshape(-1), k2.double().reshape(-1)
    denom = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    if float(denom) == 0.0:
        raise ValueError("kernel_distance of a zero kernel is undefined")
    return float(1.0 - (a @ b) / denom)


def kernel_velocity(k1: torch.Tensor, k2: torch.Tensor, dt: float = 1.0) -> float:
    """The kernel distance between two checkpoints ``dt`` apart, per unit of time (Fort et al. 2020)."""
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    return kernel_distance(k1, k2) / float(dt)


def kernel_alignment(kernel: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> float:
    """``⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F)`` with one-hot ``Y`` of integer ``labels`` (Cristianini et al. 2002).

    ``kernel``: ``[N, N]`` (a ``[N, N, K, K]`` kernel is traced over outputs first). 1 when K is a
    positive multiple of YYᵀ (same-class pairs only).
    """
    k = kernel.diagonal(dim1=2, dim2=3).sum(-1) if kernel.dim() == 4 else kernel
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape[0] != len(labels):
        raise ValueError(f"kernel of shape {tuple(kernel.shape)} does not fit {len(labels)} labels")
    y = nn.functional.one_hot(labels.long().cpu(), num_classes or int(labels.max()) + 1).double()
    yy = y @ y.T
    k = k.double().cpu()
    return float((k * yy).sum() / (torch.linalg.vector_norm(k) * torch.linalg.vector_norm(yy)))


class NTKTracker:
    """Kernel distance from the start, velocity and label alignment of a model's NTK, once per call.

    Built before training (its first kernel is the initial one), called after
    each epoch (``train_model(..., epoch_fields=tracker)``); every call returns
    ``{"ntk_distance": S(K_0, K_t), "ntk_velocity": S(K_{t−1}, K_t) per epoch,
    "ntk_alignment": alignment of K_t with the labels (when given), "ntk_norm": ‖K_t‖_F}``.
    ``state_dict`` holds the initial and the last kernel, so a resumed run
    continues the same series (``train_model`` saves it in the resume state).

    Args:
        model: the network being trained (the same object).
        inputs: the fixed subset of inputs the kernel is taken on.
        labels: their integer labels for the alignment (optional).
        kind, chunk_size: of :func:`empirical_ntk`.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 kind: str = "trace", chunk_size: int = 32):
        """Take the initial kernel now."""
        self.model, self.inputs, self.labels = model, inputs, labels
        self.kind, self.chunk_size = kind, int(chunk_size)
        self.initial = self.kernel()
        self.previous = self.initial

    def kernel(self) -> torch.Tensor:
        """The model's NTK on the inputs now (on the CPU)."""
        return empirical_ntk(self.model, self.inputs, self.kind, self.chunk_size).detach().cpu()

    def __call__(self) -> dict:
        """The measures of the kernel now against the initial and the previous one; the current becomes previous."""
        k = self.kernel()
        out = {"ntk_distance": kernel_distance(self.initial, k), "ntk_velocity": kernel_velocity(self.previous, k),
               "ntk_norm": float(torch.linalg.vector_norm(k.double()))}
        if self.labels is not None:
            out["ntk_alignment"] = kernel_alignment(k, self.labels)
        self.previous = k
        return out

    def state_dict(self) -> dict:
        """The initial and the last kernel."""
        return {"initial": self.initial.clone(), "previous": self.previous.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Continue the series of :meth:`state_dict`; a kernel of another shape is refused."""
        if tuple(state["initial"].shape) != tuple(self.initial.shape):
            raise ValueError(f"the NTK state holds kernels of shape {tuple(state['initial'].shape)}, this tracker "
                             f"{tuple(self.initial.shape)}: other inputs or kind")
        self.initial, self.previous = copy.deepcopy(state["initial"]), copy.deepcopy(state["previous"])
