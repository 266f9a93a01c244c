"""Evaluate one network (or any ``x -> logits`` function) over a loader.

Every metric pass of the library (:func:`evaluate` here, the points of a path
in :mod:`modeconn.evaluation.points`, ensembles in
:mod:`modeconn.evaluation.ensembles`) accumulates into one
:class:`MetricSums`: float64 sums on the device, read once at the end, so no
pass pays a device synchronisation per batch and all report the same numbers
for the same predictions.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["eager_attention", "eval_mode", "MetricSums", "evaluate", "token_cross_entropy"]


def token_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``[B, K]`` against labels ``[B]``, or of ``[B, T, V]`` against ``[B, T]``.

    For a language model the targets are the next tokens (the data shift them,
    :mod:`modeconn.hf.text`), so this is the causal-LM loss: the mean over every
    token of ``-log softmax(out)[y]`` (its exponential is the perplexity).

    Example:
        >>> logits, y = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
        >>> ref = F.cross_entropy(logits.reshape(6, 5), y.reshape(6))
        >>> torch.allclose(token_cross_entropy(logits, y), ref)
        True
    """
    if out.dim() > 2 and out.dim() == y.dim() + 1:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y)


@contextlib.contextmanager
def eager_attention() -> Iterator[None]:
    """PyTorch's attention fast path off inside the block; the earlier setting is restored on exit.

    In eval mode without gradients ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` switch to fused kernels
    (``aten::_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``)
    that ``torch.func.vmap`` cannot batch and that differ from the training-mode
    function in rounding. With the fast path off (``torch.backends.mha``)
    every evaluation, BN pass and trace sees the function training saw.

    Example:
        >>> with eager_attention():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> torch.backends.mha.get_fastpath_enabled()
        True
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every given module, and each of its submodules, in eval mode inside the block.

    On exit each submodule gets back its own earlier mode (not one flag for
    the whole tree), also when the block raises. Inside the block attention
    runs without PyTorch's fused fast path (:func:`eager_attention`).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
        >>> net[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with eval_mode(net):
        ...     net.training, net[1].training
        (False, False)
        >>> net.training, net[1].training
        (True, False)
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        with eager_attention():
            yield
    finally:
        for m, flag in saved:
            m.training = flag


class MetricSums:
    """Sums over batches for M prediction sets: loss (NLL), correct predictions, calibration bins.

    Sums are float64 tensors on the predictions' device, created at the first
    batch; nothing is read back before :meth:`means`. With ``num_bins > 0``
    the ECE bins ``(b/B, (b+1)/B]`` of the top-class confidence are filled too.

    Example:
        >>> sums = MetricSums()
        >>> logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])   # M=1 set, B=2 samples, C=2 classes
        >>> sums.add_logits(logits, torch.tensor([0, 0]))
        >>> m = sums.means()
        >>> m["acc"].tolist(), round(float(m["loss"][0]), 4)   # (log(1+e^-2) + log(1+e)) / 2
        ([0.5], 0.7201)
    """

    def __init__(self, num_bins: int = 0, scratch: Optional[Dict[str, torch.Tensor]] = None):
        if num_bins < 0:
            raise ValueError(f"num_bins must be >= 0, got {num_bins}")
        self.num_bins = int(num_bins)
        self.n = 0
        self.loss = self.correct = self.count = self.conf = self.hits = self.edges = None
        # add_logits' float64 work tensor lives here, reused by every batch of its shape; a caller
        # that makes many sums in a row passes one dict to all of them (see evaluation.points)
        self.scratch = {} if scratch is None else scratch

    def _zeros(self, M: int, device, *bins: int) -> torch.Tensor:
        return torch.zeros(M, *bins, dtype=torch.float64, device=device)

    def _start(self, M: int, device) -> None:
        if self.loss is not None:
            if len(self.loss) != M:
                raise ValueError(f"batches disagree on the number of prediction sets: {len(self.loss)} then {M}")
            return
        self.loss, self.correct = self._zeros(M, device), self._zeros(M, device)
        if self.num_bins:
            self.edges = torch.linspace(0, 1, self.num_bins + 1, dtype=torch.float64, device=device)[1:-1]
            self.count, self.conf, self.hits = (self._zeros(M, device, self.num_bins) for _ in range(3))

    def reserve(self, M: int, device) -> None:
        """Allocate the sums of M prediction sets now (else at the first batch).

        Before a loop of large temporaries (one forward per point): small
        long-lived blocks allocated amid them pin the top of the C heap, which
        is then handed back to the OS and page-faulted in again, point after point.
        """
        self._start(int(M), device)

    def add(self, logp: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: ``logp`` [M, B, C] log-probabilities (float64), ``y`` [B] class labels.

        Language models' [M, B, T, V] with token labels [B, T] count every token as a sample (the
        mean loss is the per-token NLL, the log of the perplexity); a negative label (-100, a
        masked-LM position without a target) is left out."""
        if logp.dim() == 4 and y.dim() == 2:
            logp, y = logp.reshape(len(logp), -1, logp.shape[-1]), y.reshape(-1)
            keep = y >= 0
            if not bool(keep.all()):
                logp, y = logp[:, keep], y[keep]
        if logp.dim() != 3:
            raise ValueError(f"predictions must be [sets, batch, classes], got shape {tuple(logp.shape)}")
        M, B, _ = logp.shape
        self._start(M, logp.device)
        y = y.to(logp.device)
        top, pred = logp.max(2)
        self._tally(-logp.gather(2, y.view(1, B, 1).expand(M, B, 1)).squeeze(2), pred, y, top)

    def _tally(self, nll: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, top_logp: torch.Tensor) -> None:
        """Add a batch's per-sample NLL, predictions and top log-probabilities (all ``[M, B]``)."""
        self.loss += nll.sum(1)
        hit = (pred == y.view(1, -1)).double()
        self.correct += hit.sum(1)
        if self.num_bins:
            conf = top_logp.exp()
            b = torch.bucketize(conf, self.edges)  # bin b holds (edge[b-1], edge[b]]
            self.count.scatter_add_(1, b, torch.ones_like(conf))
            self.conf.scatter_add_(1, b, conf)
            self.hits.scatter_add_(1, b, hit)
        self.n += int(y.numel())

    def add_logits(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch of logits [M, B, C] (normalised in float64, so the NLL keeps its digits).

        ``NLL = logsumexp(z) - z_y`` in float64, without forming the whole
        log-softmax (what :meth:`add` gets), computed as ``torch.logsumexp``
        does: shifted by the top logit (by 0 where it is infinite). The
        prediction is the argmax of the logits themselves (float32 -> float64
        is exact and the shift is common to a row, so it is the argmax of the
        log-probabilities). The classes are reduced on ``logits.transpose(1, 2)``:
        logits laid out as [M, C, B] in memory (see ``evaluation.points``) make
        every reduction run along contiguous samples. The float64 work tensor
        is kept in :attr:`scratch` for the next batch of its shape (or fewer sets).
        Language-model logits [M, B, T, V] with next-token labels [B, T]: see :meth:`add`."""
        if logits.dim() != 3:
            self.add(F.log_softmax(logits.double(), dim=-1), y)
            return
        M, B, _ = logits.shape
        self._start(M, logits.device)
        y = y.to(logits.device)
        z = logits.transpose(1, 2)                                    # [M, C, B]
        top, pred = z.max(1)
        top = top.double()
        shift = top.masked_fill(top.isinf(), 0.0)
        key = f"logits64 {tuple(z.shape[1:])} {z.device}"
        work = self.scratch.get(key)
        if work is None or len(work) < M:
            work = self.scratch[key] = torch.empty_like(z, dtype=torch.float64)
        lse = torch.sub(z, shift.unsqueeze(1), out=work[:M]).exp_().sum(1).log_().add_(shift)
        picked = z.gather(1, y.view(1, 1, B).expand(M, 1, B)).squeeze(1)
        self._tally(lse - picked.double(), pred, y, top - lse)

    def add_loss(self, loss_sum: torch.Tensor, batch_size: int) -> None:
        """Add a batch of a loss without classes (e.g. MSE): ``loss_sum`` [M] summed over the batch."""
        loss_sum = loss_sum.detach().double().reshape(-1)
        self._start(len(loss_sum), loss_sum.device)
        self.loss += loss_sum
        self.n += int(batch_size)

    def means(self) -> Dict[str, np.ndarray]:
        """``{"loss", "acc", "error"}`` (and ``"ece"`` with bins), arrays of length M: sums / n."""
        if self.n == 0:
            raise ValueError("the loader yielded no samples")
        out = {"loss": (self.loss / self.n).cpu().numpy(), "acc": (self.correct / self.n).cpu().numpy()}
        out["error"] = 1.0 - out["acc"]
        if self.num_bins:
            out["ece"] = ((self.hits - self.conf).abs().sum(1) / self.n).cpu().numpy()
        return out


def _as_modules(model) -> tuple:
    return (model,) if isinstance(model, nn.Module) else ()


@torch.no_grad()
def evaluate(model: Union[nn.Module, Callable], loader: Iterable, loss: str = "cross_entropy") -> Dict[str, float]:
    """Mean loss, accuracy, error and NLL of ``model`` over ``loader``.

    Modules run in eval mode (:func:`eval_mode`; each submodule's mode is
    restored afterwards). Sums are a :class:`MetricSums` (no per-batch
    ``.item()``); the cross-entropy is the mean of ``-log softmax(out)[y]``
    computed in float64. For ``loss="mse"`` (mean over output entries per
    sample, averaged over samples) only ``loss`` is reported.

    Example:
        >>> from modeconn.data import TensorLoader
        >>> net = nn.Linear(3, 2)
        >>> data = TensorLoader(torch.randn(10, 3), torch.randint(0, 2, (10,)), batch_size=4)
        >>> r = evaluate(net, data)
        >>> r["n"], r["loss"] == r["nll"], r["acc"] + r["error"]
        (10, True, 1.0)
    """
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"unknown loss {loss!r}; choose 'cross_entropy' or 'mse'")
    sums = MetricSums()
    with eval_mode(*_as_modules(model)):
        for x, y in loader:
            out = model(x)
            if loss == "cross_entropy":
                sums.add_logits(out.unsqueeze(0), y)
            else:
                err = F.mse_loss(out, y.reshape(out.shape).to(out.dtype), reduction="sum") / out[0].numel()
                sums.add_loss(err, len(y))
    m = sums.means()
    mean_loss = float(m["loss"][0])
    if loss == "mse":
        return {"loss": mean_loss, "n": sums.n}
    acc = float(m["acc"][0])
    return {"loss": mean_loss, "nll": mean_loss, "acc": acc, "error": 1.0 - acc, "n": sums.n}
