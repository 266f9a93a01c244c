"""An independent reference for BatchNorm statistics (no update_bn, no library code).

For every BN layer, in the order the forward pass reaches them: run the
network in eval mode (dropout off, upstream BN layers already holding their
new statistics) over the batches, take the layer's input, and store the
equal-weight average over batches of the batch mean and of the unbiased batch
variance (per channel). With one batch holding the whole training set these
are the mean and unbiased variance over the whole set.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn


def _bn_layers_in_call_order(model, x):
    order = []
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(lambda mod, inp: order.append(mod)) for m in bns]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(order))


@torch.no_grad()
def bn_by_hand(model: nn.Module, batches) -> nn.Module:
    """A copy of ``model`` (eval mode) whose BN buffers are the hand-computed statistics over ``batches``."""
    model = copy.deepcopy(model).eval()
    for bn in _bn_layers_in_call_order(model, batches[0]):
        seen = []
        hook = bn.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].double()))
        for x in batches:
            model(x)
        hook.remove()
        dims = [0] + list(range(2, seen[0].dim()))
        bn.running_mean.copy_(torch.stack([s.mean(dims) for s in seen]).mean(0))
        bn.running_var.copy_(torch.stack([s.var(dims, correction=1) for s in seen]).mean(0))
        bn.num_batches_tracked.fill_(len(batches))
    return model


@torch.no_grad()
def nll_and_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Mean -log softmax(model(x))[y] (float64) and accuracy, in eval mode, by hand."""
    model.eval()
    logp = F.log_softmax(model(x).double(), dim=1)
    return float(-logp[torch.arange(len(y)), y].mean()), float((logp.argmax(1) == y).double().mean())
