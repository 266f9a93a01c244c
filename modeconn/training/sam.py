"""Sharpness-Aware Minimisation: SAM (Foret et al. 2021) and adaptive SAM (Kwon et al. 2021).

SAM minimises ``max_{‖ε‖ ≤ ρ} L(w + ε)`` with one ascent step and one descent
step per mini-batch:

1. ``g = ∇L(w)``; ascend to ``w + ε``, ``ε = ρ g / ‖g‖`` (Foret et al., Eq. 2);
2. ``g' = ∇L(w + ε)``; go back to ``w`` and let the base optimizer step
   from ``w`` with ``g'``.

ASAM (``adaptive=True``) measures the ball in the coordinates
``T⁻¹ w`` with ``T = diag(|w| + η)`` (Kwon et al., Eq. 7 with p = 2):
``ε = ρ T² g / ‖T g‖``, so the perturbation scales with each weight's size
and the sharpness it minimises does not change when a layer is rescaled.

:class:`SAM` is a ``torch.optim.Optimizer`` around a base optimizer (SGD in
every modeconn loop) sharing its ``param_groups``, so learning-rate
schedulers work on it. Two ways to drive it:

* torch's closure convention in your own loop: ``loss = sam.step(closure)``
  where ``closure()`` zeroes the gradients, computes the loss and calls
  ``backward()`` (it is called twice);
* inside :func:`~modeconn.training.loop.run_epoch`: wrap the step function
  with :func:`sam_step_loss`, which runs the first pass, ascends and returns
  the objective at ``w + ε``; ``run_epoch``'s own ``backward()`` and
  ``optimizer.step()`` then finish the update.

The second pass reads the same batch and the same random draws of the step's
generator (a curve's t), and BatchNorm running statistics are updated only
by the first pass (at ``w``), as in the reference implementations. The
optimizer keeps no state between steps besides the base optimizer's (and,
for SSAM, its mask, step count and Fisher sums), so a resumed run continues
exactly.

SSAM (``sparsity > 0``; Mi et al. 2022, "Make Sharpness-Aware Minimization
Stronger: A Sparsified Perturbation Approach") perturbs only a binary mask m
of the parameters: ``ε = ρ (g ⊙ m) / ‖g ⊙ m‖`` (their Eq. 4), the mask keeping
the ``(1 − sparsity)`` share of all parameters (chosen over the whole network).
``mask="fisher"`` (SSAM-F) keeps the parameters of largest diagonal Fisher
information, estimated here by the mean squared mini-batch gradient at w over
the steps since the last mask update (the gradients SAM's first pass computes
anyway, so the mask costs no extra pass; Mi et al. use per-sample gradients
of sampled labels); ``mask="random"`` draws a uniformly random mask from a
seeded generator. The mask is renewed every ``mask_interval`` steps (its first
at the first step). With ``sparsity = 0`` the mask holds every parameter and
the step is SAM's.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["SAM", "sam_step_loss", "frozen_bn_statistics", "top_share_mask", "SAM_MASKS"]

SAM_MASKS = ("fisher", "random")


def top_share_mask(scores: List[torch.Tensor], keep: float) -> List[torch.Tensor]:
    """Boolean masks (shapes of ``scores``) keeping the ``round(keep · P)`` largest scores over all P entries.

    Ties are broken by ``torch.topk``; ``keep`` in [0, 1].
    """
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = int(round(float(keep) * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    return [c.view_as(s) for c, s in zip(chosen.split([s.numel() for s in scores]), scores)]


class SAM(torch.optim.Optimizer):
    """SAM / ASAM around ``base`` (an optimizer built by this class on the same parameters).

    Args:
        params: the parameters (or parameter groups) to train.
        base: optimizer class, e.g. ``torch.optim.SGD``.
        rho: radius ρ > 0 of the neighbourhood (Foret et al. use 0.05 for SGD;
            ASAM needs a larger one, Kwon et al. use 0.5 to 2).
        adaptive: ASAM's scale-invariant ball (``T = |w| + eta``).
        eta: ASAM's η (Kwon et al.: 0.01), ignored without ``adaptive``.
        sparsity: SSAM's share of parameters left unperturbed, in [0, 1) (Mi et al.: 0.5); needs ``mask``.
        mask: ``"fisher"`` or ``"random"`` (SSAM-F / a random mask), ``None`` for plain SAM.
        mask_interval: steps between mask updates (``train_model`` passes one epoch's steps).
        mask_seed: seed of the random masks (the k-th mask draws from ``mask_seed + k``).
        **base_kwargs: for ``base`` (lr, momentum, weight_decay, ...).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> sam = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> def closure():
        ...     sam.zero_grad()
        ...     loss = nn.functional.mse_loss(net(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = float(sam.step(closure).detach())
        >>> float(nn.functional.mse_loss(net(x), y).detach()) < first
        True
    """

    def __init__(self, params: Iterable, base: Callable[..., torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, sparsity: float = 0.0, mask: Optional[str] = None,
                 mask_interval: int = 1, mask_seed: int = 0, **base_kwargs):
        if not (rho > 0 and rho < float("inf")):
            raise ValueError(f"rho (the SAM radius) must be a finite number > 0, got {rho}")
        if adaptive and not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        _check_sparse(sparsity, mask, mask_interval)
        super().__init__(params, dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta)))
        self.base = base(self.param_groups, **base_kwargs)
        self.param_groups = self.base.param_groups  # one set of groups: schedulers change base's lr
        self.defaults.update(self.base.defaults)
        self._origin: Optional[List[torch.Tensor]] = None
        self.sparsity, self.mask, self.mask_interval = float(sparsity), mask, int(mask_interval)
        self.mask_seed = int(mask_seed)
        self._sparse = {"steps": 0, "masks": None, "fisher": None, "fisher_steps": 0}

    def _params(self) -> List[torch.Tensor]:
        """Every parameter of every group."""
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def first_step(self) -> None:
        """Ascend: ``w ← w + ε`` from the gradients now in ``p.grad`` (missing gradients count as 0).

        ``ε = ρ g / ‖g‖`` (SAM) or ``ρ T² g / ‖T g‖``, ``T = |w| + η`` (ASAM); the
        norm runs over all groups together; a zero gradient gives ε = 0.
        """
        params = self._params()
        self._origin = [p.detach().clone() for p in params]
        scaled = []  # T g per group's parameters (g itself for SAM)
        for g in self.param_groups:
            for p in g["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                scaled.append(grad * (p.abs() + g["eta"]) if g["adaptive"] else grad)
        if self.mask is not None:  # SSAM: ε = ρ (g ⊙ m)/‖g ⊙ m‖ (Mi et al., Eq. 4)
            masks = self._update_mask(params)
            scaled = [s * m for s, m in zip(scaled, masks)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        k = 0
        for g in self.param_groups:
            scale = g["rho"] / norm.clamp_min(1e-12)  # no host sync; ε = 0 when g = 0
            for p in g["params"]:
                t = (p.abs() + g["eta"]) if g["adaptive"] else 1.0
                p.add_(scaled[k] * t * scale)
                k += 1

    def _update_mask(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """Accumulate the Fisher sums g², renew the mask every ``mask_interval`` steps; the mask in force."""
        st = self._sparse
        if self.mask == "fisher":
            sq = [(p.grad.detach() ** 2 if p.grad is not None else torch.zeros_like(p)) for p in params]
            st["fisher"] = sq if st["fisher"] is None else [f + q for f, q in zip(st["fisher"], sq)]
            st["fisher_steps"] += 1
        if st["steps"] % self.mask_interval == 0:
            if self.mask == "fisher":
                scores = [f / st["fisher_steps"] for f in st["fisher"]]
                st["fisher"], st["fisher_steps"] = None, 0
            else:
                gen = torch.Generator().manual_seed(self.mask_seed + st["steps"] // self.mask_interval)
                scores = [torch.rand(p.shape, generator=gen).to(p.device) for p in params]
            st["masks"] = [m.to(p.dtype) for m, p in zip(top_share_mask(scores, 1.0 - self.sparsity), params)]
        st["steps"] += 1
        return st["masks"]

    def mask_share(self) -> float:
        """The share of parameters the mask in force perturbs (1.0 for plain SAM or before the first step)."""
        masks = self._sparse["masks"]
        if self.mask is None or masks is None:
            return 1.0
        return float(sum(m.sum() for m in masks) / sum(m.numel() for m in masks))

    @torch.no_grad()
    def second_step(self) -> None:
        """Back to ``w`` (restored exactly, not by subtracting ε), then the base optimizer's step."""
        if self._origin is None:
            raise RuntimeError("SAM.step() without a closure finishes a step that first_step() began; "
                               "call first_step() (or sam_step_loss / step(closure)) first")
        for p, w in zip(self._params(), self._origin):
            p.copy_(w)
        self._origin = None
        self.base.step()

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One SAM update. With ``closure`` (zero grads, loss, ``backward()``): both passes, returns the
        loss at ``w``. Without: the second half after :meth:`first_step` and a backward at ``w + ε``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.first_step()
            with torch.enable_grad():
                closure()
        self.second_step()
        return loss

    def state_dict(self):
        """The base optimizer's state (SAM keeps nothing between steps) and ρ, adaptive, η."""
        g = self.param_groups[0]
        out = {"base": self.base.state_dict(), "sam": {k: g[k] for k in ("rho", "adaptive", "eta")}}
        if self.mask is not None:  # only for SSAM: SAM states of earlier versions still load
            out["sam"].update(sparsity=self.sparsity, mask=self.mask, mask_interval=self.mask_interval,
                              mask_seed=self.mask_seed)
            out["ssam"] = {k: (list(v) if isinstance(v, list) else v) for k, v in self._sparse.items()}
        return out

    def load_state_dict(self, state_dict) -> None:
        """Restore :meth:`state_dict`; a state of other SAM settings is refused."""
        mine = self.state_dict()["sam"]
        if state_dict.get("sam") != mine:
            raise ValueError(f"the optimizer state has SAM settings {state_dict.get('sam')}, this run {mine}")
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        if self.mask is not None:
            self._sparse = {k: (list(v) if isinstance(v, list) else v) for k, v in state_dict["ssam"].items()}


def _check_sparse(sparsity: float, mask: Optional[str], interval: int) -> None:
    """ValueError naming the bad SSAM argument."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity (the share of parameters SSAM leaves unperturbed) must be in [0, 1), "
                         f"got {sparsity}")
    if mask is None and sparsity > 0:
        raise ValueError(f"sparsity {sparsity} needs a mask: 'fisher' or 'random'")
    if mask is not None and mask not in SAM_MASKS:
        raise ValueError(f"unknown SSAM mask {mask!r}; use one of {SAM_MASKS}")
    if isinstance(interval, bool) or int(interval) != interval or interval < 1:
        raise ValueError(f"mask_interval must be an integer >= 1, got {interval}")


@contextlib.contextmanager
def frozen_bn_statistics(module: nn.Module) -> Iterator[None]:
    """A block whose forward passes leave every BatchNorm layer's running statistics as they were.

    Momentum 0 makes the layers' own update ``(1 - 0)·running + 0·batch`` a no-op
    (the buffers are saved for the backward, so they are not overwritten
    afterwards); ``num_batches_tracked`` is put back after the block.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, tracked) in zip(bns, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)


def sam_step_loss(step_loss: Callable, sam: SAM, module: nn.Module) -> Callable:
    """A step function for :func:`~modeconn.training.loop.run_epoch` that makes its update a SAM update.

    ``step_loss(x, y, generator) -> (output, objective, logged_loss)`` is run at
    ``w`` (its objective back-propagated, ``sam.first_step()`` ascending to
    ``w + ε``), then again at ``w + ε`` with the generator replayed (same t)
    and ``module``'s BatchNorm statistics frozen. Returned: the output and
    logged loss at ``w``, the objective at ``w + ε``; ``run_epoch``'s backward
    and ``sam.step()`` then step from ``w``.
    """
    def step(x, y, generator):
        """Both passes of one SAM step; the caller back-propagates the second objective."""
        replay = generator.get_state()
        out, objective, logged = step_loss(x, y, generator)
        sam.zero_grad(set_to_none=True)
        objective.backward()
        sam.first_step()
        after = generator.get_state()
        generator.set_state(replay)
        with frozen_bn_statistics(module):
            _, perturbed, _ = step_loss(x, y, generator)
        generator.set_state(after)
        return out.detach(), perturbed, logged.detach()

    return step
