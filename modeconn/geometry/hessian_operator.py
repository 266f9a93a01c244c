"""The Hessian of a mean data loss as a linear map on flat parameter vectors.

The loss is the mean over the data,

    L(θ) = (1/N) Σ_b n_b · loss_fn(functional_call(model, θ, x_b), y_b),

where each batch's ``loss_fn`` is a mean over its ``n_b`` samples, so the
product over several batches is the sample-weighted average of the per-batch
products: exactly the full-data Hessian times ``v``. θ is the model's
``named_parameters`` (those with ``requires_grad``, or the subset
``param_names``) flattened, in that order, into one vector of length P: the
:class:`~modeconn.core.layout.FlatLayout` ``FlatLayout.of(model, param_names)``.

Products are built with ``torch.func`` (forward-over-reverse,
``jvp(grad(L))``; ``mode="reverse"`` uses ``vjp`` of ``grad`` for models with
an op that has no forward-mode derivative). Attention
(``F.scaled_dot_product_attention``, also inside ``nn.MultiheadAttention``)
runs on its math backend during products: the fused CPU kernel has neither a
forward-mode nor a second derivative, nor a vmap batching rule; the math
backend computes the same function from matmuls and a softmax.

Mode and buffers. During every product the model is in **eval mode**
(dropout off, BatchNorm normalising with its running statistics as they
are: recompute them first with :func:`modeconn.evaluation.bn.recompute_bn`
for a point of a curve), and every submodule's previous mode is restored
afterwards. Buffers are read, never written. ``bn_stats="batch"`` instead
normalises every BatchNorm layer with the statistics of the batch at hand
(the function SGD differentiates); that Hessian then depends on how the data
is batched.

Data. ``data`` is a list of ``(x, y)`` batches or any loader yielding them;
it must yield the same samples every time (no random augmentation; the
order does not matter). Batches are moved to the device of the model's
parameters.

Graph reuse. The operator is the Hessian at one fixed point: θ, the fixed
parameters and the buffers are copied when it is built, so later edits of
the model (training, ``recompute_bn``) never leak into its products; build a
new operator for a new point. With ``reuse_graph`` (default: on when
``data`` is a list or tuple, i.e. already in memory; off for loaders) the
first product builds, once per batch, the reverse-mode graph of ``∇L_b(θ)``
(one forward and one backward with ``create_graph``), and every product is
then one backward pass through those graphs (``H_b v`` is the vjp of
``∇L_b`` with ``v``, as PyHessian does for one batch; several vectors at
once with ``is_grads_batched``); a loader is iterated once. Memory: the
graphs of all batches stay alive until
:meth:`HessianOperator.release_graphs` or the operator is dropped, about
two to three times the activations a training step keeps for the same
samples. Without reuse the data is iterated once per product and each
product rebuilds its batch graph: ``mode="forward"`` (``jvp`` of ``grad``,
the faster per-product build) by default. Forward mode cannot reuse a
reverse graph, so ``reuse_graph=True`` requires ``mode`` None or 'reverse'.

Eval-mode BatchNorm is differentiated as the affine map it is,
``x·s + (b - μ·s)`` with ``s = w/√(σ²+ε)``: the same function, whose second
derivative is a few elementwise products where the fused kernel's double
backward also recomputes batch-statistics terms eval mode does not have
(a quarter of a product of a small BN CNN).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from modeconn.core.layout import FlatLayout
from modeconn.evaluation.model import eval_mode, token_cross_entropy
from modeconn.runtime import Hooks

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossLike = Union[None, str, LossFn]

MODES = ("forward", "reverse")
BN_STATS = ("running", "batch")

__all__ = ["HessianOperator", "hessian_vector_product"]


def _get_loss(loss_fn: LossLike) -> LossFn:
    """``None``/'cross_entropy' (default), 'mse' (``F.mse_loss``, no 1/2) or a callable."""
    if loss_fn is None or loss_fn == "cross_entropy":
        return token_cross_entropy
    if callable(loss_fn):
        return loss_fn
    if loss_fn == "mse":
        # F.mse_loss written out: torch's forward-over-reverse rule of its mean reduction raises
        # "ZeroTensors are immutable" (pytorch#123996), and forward mode is the default without reuse
        return lambda out, y: (out - y.reshape(out.shape).to(out.dtype)).pow(2).mean()
    raise ValueError(f"unknown loss_fn {loss_fn!r}; use 'cross_entropy', 'mse', None or a callable (out, y) -> scalar")


def _batch_size(x, y) -> int:
    """Samples in a batch: the leading size of ``y`` (or ``x``), else ``len(y)``."""
    if isinstance(y, torch.Tensor) and y.dim() > 0:
        return int(y.shape[0])
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return int(x.shape[0])
    return len(y)


def _chosen_names(model: nn.Module, param_names: Optional[Sequence[str]]) -> list:
    """The parameters to differentiate: ``param_names`` as given, or every one with ``requires_grad``."""
    if param_names is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        names = [param_names] if isinstance(param_names, str) else list(param_names)
        if len(set(names)) != len(names):
            raise ValueError(f"param_names has duplicates: {names}")
    if not names:
        raise ValueError("no parameters to differentiate (the model has no parameters with "
                         "requires_grad, or param_names is empty)")
    return names


def _affine_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5):
    """Eval-mode ``F.batch_norm`` as ``x·s + (b - μ·s)``, ``s = w/√(σ²+ε)``; None when it normalises
    with the batch's statistics (training, or no running statistics)."""
    if training or running_mean is None or running_var is None:
        return None
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(running_var + eps)
    scale = scale * weight if weight is not None else scale
    shift = -running_mean * scale
    shift = shift + bias if bias is not None else shift
    return torch.addcmul(shift.view(shape), input, scale.view(shape))


class _AffineEvalBatchNorm(TorchFunctionMode):
    """Routes eval-mode ``F.batch_norm`` calls to :func:`_affine_batch_norm` (module docstring: why)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            out = _affine_batch_norm(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def _product_context():
    """Math-backend attention, affine eval BatchNorm, and torch's jit-deprecation warning silenced."""
    with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH), _AffineEvalBatchNorm():
        # torch's first forward-AD call scripts its jvp decompositions and warns
        # that torch.jit.script is deprecated: torch-internal, nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
        yield


def _resolve_reuse(data, mode: Optional[str], reuse_graph: Optional[bool]):
    """``(mode, reuse_graph)`` after defaults: reuse for in-memory lists/tuples unless forward mode is asked."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES} (or None: automatic)")
    if reuse_graph is None:
        reuse_graph = isinstance(data, (list, tuple)) and mode != "forward"
    reuse_graph = bool(reuse_graph)
    if reuse_graph and mode == "forward":
        raise ValueError("mode='forward' cannot reuse a graph (a jvp of grad is rebuilt for every product); "
                         "use mode='reverse' or None with reuse_graph=True, or reuse_graph=False")
    return (mode or ("reverse" if reuse_graph else "forward")), reuse_graph


class HessianOperator:
    """The Hessian of the mean data loss as a linear map ``v -> H v`` on flat vectors.

    Args:
        model: any ``nn.Module``; only read (its parameters are the point θ).
        loss_fn: ``(out, y) -> scalar`` mean loss; ``None`` = cross-entropy;
            'mse' for ``F.mse_loss``.
        data: list of ``(x, y)`` batches or a loader yielding them (see the
            module docstring).
        param_names: parameters to differentiate, by name (default: every
            ``named_parameters`` entry with ``requires_grad``); the others
            stay fixed at their values.
        dtype: compute in this floating dtype (e.g. ``torch.float64`` for
            tests); parameters, buffers and floating inputs/targets are cast.
            Default: the parameters' dtype.
        mode: 'forward' (``jvp`` of ``grad``) or 'reverse' (``vjp`` of
            ``grad``); None (default): 'reverse' when the graph is reused,
            else 'forward'.
        bn_stats: 'running' (BatchNorm uses its running statistics, default)
            or 'batch' (statistics of each batch).
        reuse_graph: build each batch's gradient graph once and reuse it for
            every product (module docstring: memory). None (default): on for
            a list/tuple ``data`` unless ``mode='forward'``, off otherwise.

    Attributes: ``layout`` (the :class:`~modeconn.core.layout.FlatLayout`
    of the differentiated parameters), ``param_names``, ``num_params`` (P),
    ``theta`` (the point, flat), ``dtype``, ``device``, ``mode``,
    ``reuse_graph``, ``num_matvecs`` (products computed so far; a
    :meth:`matmat` of m vectors counts m).
    """

    def __init__(self, model: nn.Module, loss_fn: LossLike, data: Iterable, *,
                 param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                 mode: Optional[str] = None, bn_stats: str = "running", reuse_graph: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        mode, reuse_graph = _resolve_reuse(data, mode, reuse_graph)
        if bn_stats not in BN_STATS:
            raise ValueError(f"unknown bn_stats {bn_stats!r}; choose one of {BN_STATS}")
        if data is None:
            raise ValueError("data is None; pass a list of (x, y) batches or a loader")
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError("data is empty: the Hessian of a loss needs at least one (x, y) batch")
        self.model, self.loss_fn, self.data = model, _get_loss(loss_fn), data
        self.mode, self.bn_stats, self.reuse_graph = mode, bn_stats, reuse_graph
        self._graphs = None  # [(pullback of ∇L_b at θ, n_b)], built by the first product when reuse_graph
        self.layout = FlatLayout.of(model, _chosen_names(model, param_names))  # raises for unknown names
        self.param_names = list(self.layout.names)
        first = model.get_parameter(self.param_names[0])
        self.device = first.device
        self.dtype = dtype if dtype is not None else first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        self.num_params = self.layout.num_parameters
        self.theta = self.layout.flatten(model, dtype=self.dtype)
        self.fixed = self._fixed_inputs()
        self.num_matvecs = 0

    def _fixed_inputs(self) -> Dict[str, Optional[torch.Tensor]]:
        """Everything else the forward reads, held fixed and cast to the compute dtype.

        The parameters not differentiated and the buffers; with
        ``bn_stats="batch"`` BatchNorm's running buffers are None, so the
        layers normalise with the statistics of each batch.
        """
        def cast(t: torch.Tensor) -> torch.Tensor:  # a copy: the operator is for the point as it was built
            t = t.detach()
            return t.to(self.dtype, copy=True) if t.is_floating_point() else t.clone()

        chosen = set(self.param_names)
        fixed = {n: cast(p) for n, p in self.model.named_parameters() if n not in chosen}
        fixed.update({n: cast(b) for n, b in self.model.named_buffers()})
        if self.bn_stats == "batch":
            for mod_name, mod in self.model.named_modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    prefix = f"{mod_name}." if mod_name else ""
                    for b in ("running_mean", "running_var", "num_batches_tracked"):
                        if getattr(mod, b, None) is not None:
                            fixed[prefix + b] = None
        return fixed

    # ------------------------------------------------------------ internals
    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Flat vector (length P) -> dict name -> tensor of the parameter's shape (``layout.unflatten``)."""
        return self.layout.unflatten(flat)

    def _prepare(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` on the operator's device and dtype, after checking its last dimension is P."""
        v = torch.as_tensor(v)
        if v.shape[-1:] != (self.num_params,):
            raise ValueError(f"vector length {tuple(v.shape)} does not match the number of parameters "
                             f"P={self.num_params}")
        return v.to(device=self.device, dtype=self.dtype)

    def _move(self, t):
        """A batch tensor on the operator's device (floating ones in its dtype); anything else as is."""
        if isinstance(t, torch.Tensor):
            t = t.to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t
        return t

    def _batches(self):
        """``(x, y, n_b)`` of every non-empty batch of one pass, moved and cast, the model in eval mode."""
        with eval_mode(self.model):
            for x, y in self.data:
                x, y = self._move(x), self._move(y)
                nb = _batch_size(x, y)
                if nb:
                    yield x, y, nb

    def _batch_loss(self, x, y) -> Callable[[torch.Tensor], torch.Tensor]:
        """``flat -> loss_fn(model at flat (x), y)``: one batch's mean loss as a function of θ."""
        def batch_loss(flat):
            params = dict(self.fixed)
            params.update(self.unflatten(flat))
            return self.loss_fn(functional_call(self.model, params, (x,)), y)

        return batch_loss

    def _batch_hvp(self, x, y, v: torch.Tensor, batched: bool) -> torch.Tensor:
        """``H_b v`` of one batch's mean loss, its graph built for this product (rows of ``v`` under
        vmap when ``batched``)."""
        g = grad(self._batch_loss(x, y))
        if self.mode == "forward":
            def hvp(t):
                return jvp(g, (self.theta,), (t,))[1]
        else:
            _, pullback = vjp(g, self.theta)

            def hvp(t):
                return pullback(t)[0]
        try:
            with _product_context():
                return vmap(hvp)(v) if batched else hvp(v)
        except NotImplementedError as e:
            if self.mode == "forward":
                raise NotImplementedError(f"{e}\nAn op of this model has no forward-mode derivative; "
                                          f"use mode='reverse'.") from e
            raise

    def _built_graphs(self) -> list:
        """``[(∇L_b at θ with its graph, θ leaf, n_b)]`` of every batch, built by the first call (one pass).

        Plain autograd (``create_graph``) rather than ``torch.func.vjp``: the
        same graph, built and traversed with less wrapper work (measured
        ~10% per build + 7 products on the digits CNN).
        """
        if self._graphs is None:
            graphs = []
            for x, y, nb in self._batches():
                theta = self.theta.detach().requires_grad_(True)
                with _product_context(), torch.enable_grad():
                    g = torch.autograd.grad(self._batch_loss(x, y)(theta), theta, create_graph=True)[0]
                graphs.append((g, theta, nb))
            self._graphs = graphs
        return self._graphs

    def release_graphs(self) -> None:
        """Free the reused graphs (their memory); the next product rebuilds them, same θ, same values."""
        self._graphs = None

    def _batch_products(self, v: torch.Tensor, batched: bool):
        """``(H_b v, n_b)`` of every batch: through the reused graphs, or one pass building each."""
        if not self.reuse_graph:
            for x, y, nb in self._batches():
                yield self._batch_hvp(x, y, v, batched), nb
            return
        for g, theta, nb in self._built_graphs():
            with torch.enable_grad():  # H_b v = the vjp of ∇L_b(θ) with v, through the kept graph
                yield torch.autograd.grad(g, theta, v, retain_graph=True, is_grads_batched=batched)[0], nb

    def _apply(self, v: torch.Tensor, batched: bool) -> torch.Tensor:
        """The sample-weighted mean of the batch products."""
        total, n = None, 0
        for hv, nb in self._batch_products(v, batched):
            total = hv * nb if total is None else total + hv * nb
            n += nb
        if n == 0:
            raise ValueError("data yielded no samples: the Hessian of a loss needs at least one (x, y) batch")
        self.num_matvecs += v.shape[0] if batched else 1
        return (total / n).detach()

    # ---------------------------------------------------------------- public
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for one flat vector ``v`` (length P); one pass over the data (or the reused graphs)."""
        v = self._prepare(v)
        if v.dim() != 1:
            raise ValueError(f"matvec takes a 1-D vector, got shape {tuple(v.shape)}")
        return self._apply(v, batched=False)

    __call__ = matvec

    def matmat(self, vs: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """``H v`` for each row of ``vs`` ([m, P]); ``torch.func.vmap`` over the
        vectors, ``chunk`` rows (default all) per pass over the data."""
        vs = self._prepare(vs)
        if vs.dim() != 2:
            raise ValueError(f"matmat takes a 2-D [m, P] tensor, got shape {tuple(vs.shape)}")
        chunk = vs.shape[0] if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return torch.cat([self._apply(c, batched=True) for c in vs.split(chunk)])

    def loss_and_grad(self, flat: Optional[torch.Tensor] = None):
        """``(L(θ), ∇L(θ))`` of the mean data loss at the flat point ``flat`` (default: the operator's θ),
        under the same conventions as the products (eval mode, fixed buffers, dtype); one pass over the data."""
        flat = self.theta if flat is None else self._prepare(flat)
        total_loss, total_grad, n = 0.0, 0.0, 0
        for x, y, nb in self._batches():
            g, value = grad_and_value(self._batch_loss(x, y))(flat)
            total_loss, total_grad, n = total_loss + value * nb, total_grad + g * nb, n + nb
        if n == 0:
            raise ValueError("data yielded no samples: the loss needs at least one (x, y) batch")
        return (total_loss / n).detach(), (total_grad / n).detach()

    def as_linear_operator(self, shift: float = 0.0, hooks: Optional[Hooks] = None) -> LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` for ``H - shift·I``; ``hooks.advance(1)`` per product."""
        hooks = hooks or Hooks()

        def mv(v: np.ndarray) -> np.ndarray:
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            out = self.matvec(torch.from_numpy(v)).to(device="cpu", dtype=torch.float64).numpy()
            hooks.advance(1)
            return out - shift * v if shift else out

        return LinearOperator((self.num_params, self.num_params), matvec=mv, rmatvec=mv, dtype=np.float64)


def hessian_vector_product(model: nn.Module, loss_fn: LossLike, data: Iterable, v: torch.Tensor, *,
                           param_names: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
                           mode: Optional[str] = None, bn_stats: str = "running") -> torch.Tensor:
    """``H v`` for the flat vector ``v`` (length P, parameters in ``named_parameters``
    order), H the Hessian of the mean loss over ``data``.

    For many products build a :class:`HessianOperator` once instead (it can
    reuse the gradient graph); one product builds no graph to keep
    (``mode`` None = 'forward').

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2)
        >>> def loss(out, y):               # 0.5 · mean squared error: H = XᵀX / n = diag(0.5, 2)
        ...     return 0.5 * (out.squeeze(-1) - y).pow(2).mean()
        >>> hessian_vector_product(model, loss, [(x, y)], torch.tensor([1.0, 1.0]))
        tensor([0.5000, 2.0000])
    """
    op = HessianOperator(model, loss_fn, data, param_names=param_names, dtype=dtype, mode=mode, bn_stats=bn_stats,
                         reuse_graph=False)
    return op.matvec(v)
