"""The training point θ = c @ bends, with the weight decay at θ inside its backward.

Garipov et al. 2018's curve objective: the loss at θ(t) plus
``0.5 * wd * ||θ(t)||²``, only the free bends trained. :class:`DecayedWeights`
gives θ as one tensor per parameter (``training_weights``, what a training step
runs). No flat θ or flat dθ is made, only the bends' gradient has P entries: on a CPU every fresh buffer of P floats (60 MB for
  VGG16) is new memory from the OS, paid for with page faults, while
  per-parameter tensors reuse the allocator's memory. Each parameter's slice of θ is computed
  from the bends' columns, and the backward writes ``c_free ⊗ (dθ + wd·θ)``
  straight into the gradient, slice by slice. On the CPU, θ's parameters and
  the gradient live in memory kept from the previous step (:class:`Scratch`)
  whenever no tensor of that step is still alive, so a step makes no fresh
  P-sized buffer at all.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch.autograd.function import once_differentiable


def _in_use(storage) -> bool:
    """Whether a tensor other than the scratch's own handle still uses ``storage`` (True if torch cannot tell)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count is None or count(storage._cdata) > 1


class Scratch:
    """Memory a training step hands out again: a buffer is reused only when no tensor still refers to it.

    Fresh CPU buffers of many MB are new memory from the OS, paid for with page
    faults at every step; reusing one is safe when its only reference is the
    scratch's (the previous step's tensors are gone). Otherwise, or off the CPU,
    or when torch cannot count references, a fresh buffer is made (and kept).
    Copies and pickles of a model start with an empty scratch.
    """

    def __init__(self):
        self._storages = {}

    def __deepcopy__(self, memo):
        return Scratch()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._storages = {}

    def empty(self, key: str, shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (dtype and device of ``like``), uninitialised, under the name ``key``."""
        numel = math.prod(shape)
        if like.device.type != "cpu":
            return like.new_empty(shape)
        held = self._storages.get(key)   # untyped bytes: any dtype may reuse them if they are enough
        if held is None or held.nbytes() < numel * like.element_size() or _in_use(held):
            held = like.new_empty(numel).untyped_storage()
            self._storages[key] = held
        return like.new_empty(0).set_(held, 0, shape)


class DecayedWeights(torch.autograd.Function):
    """θ = c_free @ free + c_fixed @ fixed, split into the parameters' shapes; backward: dθ + wd·θ on the free bends.

    ``apply(free [F, P], fixed [Kf, P], c_free [F], c_fixed [Kf], shapes, weight_decay, scratch)``
    returns one tensor per entry of ``shapes`` (the layout's order); the gradient
    of ``free`` is ``outer(c_free, dθ + wd·θ)``, assembled per parameter. Once
    differentiable (a training step; second-order code uses ``flat_weights_at``).
    """

    @staticmethod
    def forward(ctx, free, fixed, c_free, c_fixed, shapes: Sequence[Tuple[int, ...]], weight_decay: float,
                scratch: Scratch):
        """Each parameter's θ from its columns of the bends: one ``mm`` and one in-place ``addmm_``."""
        outs, start = [], 0
        cf, cx = c_free.unsqueeze(0), c_fixed.unsqueeze(0)
        storage = scratch.empty("theta", (free.shape[1],), free).untyped_storage()
        for shape in shapes:
            out = free.new_empty(0).set_(storage, start, shape)  # its own tensor, not a view of another output
            n = out.numel()
            row = out.view(1, n)
            torch.mm(cx, fixed[:, start:start + n], out=row)
            row.addmm_(cf, free[:, start:start + n])
            outs.append(out)
            start += n
        ctx.weight_decay, ctx.num_parameters, ctx.scratch = float(weight_decay), start, scratch
        ctx.save_for_backward(c_free, *(outs if weight_decay else ()))
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        """``grad[f, slice] = c_free[f] · (dθ_slice + wd·θ_slice)``, written into one ``[F, P]`` tensor."""
        c_free, *thetas = ctx.saved_tensors
        wd = ctx.weight_decay
        grad = ctx.scratch.empty("grad", (c_free.numel(), ctx.num_parameters), c_free)
        start = 0
        for i, g in enumerate(grads):
            n = g.numel()
            first = grad[0, start:start + n]
            if wd:
                torch.add(g.reshape(-1), thetas[i].view(-1), alpha=wd, out=first)
            else:
                first.copy_(g.reshape(-1))
            for f in range(1, len(c_free)):  # several free bends: each gets its own multiple
                torch.mul(first, c_free[f], out=grad[f, start:start + n])
            first.mul_(c_free[0])
            start += n
        return grad, None, None, None, None, None, None
