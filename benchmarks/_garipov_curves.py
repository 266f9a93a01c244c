"""The per-layer curve algorithm of Garipov et al. 2018, written here as the peer of ``CurveModel``.

Garipov et al.'s code (github.com/timgaripov/dnn-mode-connectivity) gives every
layer of a curve network K copies ("bends") of each of its tensors, as
parameters (the fixed ends with ``requires_grad=False``). A step computes the
Bezier coefficients c(t) once, and each layer builds its own weights
W(t) = sum_k c_k(t) W_k in its forward and adds ||W(t)||^2 to the network's
``l2``; the training loss is CE + 0.5 * wd * l2 (their ``l2_regularizer``), and
SGD with momentum runs on the free bends only. This module writes that
algorithm for the zoo's VGG16 (:mod:`modeconn.models.vgg`, any width) and
PreResNet (:mod:`modeconn.models.preresnet`, basic blocks, any depth 6n+2),
with the zoo's parameter names, so :func:`load_bends` puts a ``CurveModel``'s
bends into it and both compute the same network. Also the plain reference
models, as the papers' code writes them (in-place ReLU, ``out += residual``),
for the plain-step rows. No code is copied from the reference repository.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.models.vgg import VGG_CONFIGS


def bezier_coefficients(t: torch.Tensor, num_bends: int) -> torch.Tensor:
    """Bernstein weights C(n,k) t^k (1-t)^(n-k), n = K-1, computed once per step."""
    n = num_bends - 1
    k = torch.arange(n + 1, dtype=t.dtype)
    binom = torch.tensor([math.comb(n, i) for i in range(n + 1)], dtype=t.dtype)
    return binom * t.pow(k) * (1 - t).pow(n - k)


class CurveLayer(nn.Module):
    """A layer whose tensors ``name`` are held as K bends ``name_0 .. name_{K-1}``; ends fixed."""

    def _bends(self, name: str, shape, num_bends: int, fixed: List[bool], init) -> None:
        for k in range(num_bends):
            p = nn.Parameter(init(torch.empty(shape)), requires_grad=not fixed[k])
            self.register_parameter(f"{name}_{k}", p)
        self._names = getattr(self, "_names", []) + [name]
        self.num_bends = num_bends

    def weights(self, coeffs: torch.Tensor) -> List[torch.Tensor]:
        """W(t) = sum_k c_k W_k for each tensor; ||W(t)||^2 summed into ``self.l2``."""
        out, l2 = [], 0.0
        for name in self._names:
            w = getattr(self, f"{name}_0") * coeffs[0]
            for k in range(1, self.num_bends):
                w += getattr(self, f"{name}_{k}") * coeffs[k]
            l2 = l2 + torch.sum(w ** 2)
            out.append(w)
        self.l2 = l2
        return out


class CurveConv2d(CurveLayer):
    def __init__(self, cin, cout, kernel_size, num_bends, fixed, stride=1, padding=0, bias=True):
        super().__init__()
        self.stride, self.padding = stride, padding
        self._bends("weight", (cout, cin, kernel_size, kernel_size), num_bends, fixed, nn.init.normal_)
        if bias:
            self._bends("bias", (cout,), num_bends, fixed, nn.init.zeros_)

    def forward(self, x, coeffs):
        w = self.weights(coeffs)
        return F.conv2d(x, w[0], w[1] if len(w) > 1 else None, self.stride, self.padding)


class CurveLinear(CurveLayer):
    def __init__(self, fin, fout, num_bends, fixed):
        super().__init__()
        self._bends("weight", (fout, fin), num_bends, fixed, nn.init.normal_)
        self._bends("bias", (fout,), num_bends, fixed, nn.init.zeros_)

    def forward(self, x, coeffs):
        w, b = self.weights(coeffs)
        return F.linear(x, w, b)


class CurveBatchNorm2d(CurveLayer):
    def __init__(self, channels, num_bends, fixed):
        super().__init__()
        self._bends("weight", (channels,), num_bends, fixed, nn.init.ones_)
        self._bends("bias", (channels,), num_bends, fixed, nn.init.zeros_)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x, coeffs):
        w, b = self.weights(coeffs)
        return F.batch_norm(x, self.running_mean, self.running_var, w, b, self.training, 0.1, 1e-5)


def _run(layers: Iterable[nn.Module], x, coeffs):
    for m in layers:
        x = m(x, coeffs) if isinstance(m, CurveLayer) else m(x)
    return x


class CurveNet(nn.Module):
    """A curve network: ``forward(x, t)``; ``l2()`` the penalty's sum over the layers of the last forward."""

    def forward(self, x, t):
        return self.body(x, bezier_coefficients(t, self.num_bends))

    def l2(self):
        return sum(m.l2 for m in self.modules() if isinstance(m, CurveLayer))


class CurveVGG16(CurveNet):
    """The zoo's vgg16 (pools skipped at spatial size 1, ``width_multiplier``) as per-layer curve layers."""

    def __init__(self, input_shape=(3, 32, 32), num_classes=10, num_bends=3, fixed=(True, False, True),
                 width_multiplier: float = 1.0):
        super().__init__()
        self.num_bends, fixed = num_bends, list(fixed)
        c, h, w = input_shape
        layers: List[nn.Module] = []
        for stage in VGG_CONFIGS[16]:
            for ch in stage:
                ch = max(1, int(round(ch * width_multiplier)))
                layers += [CurveConv2d(c, ch, 3, num_bends, fixed, padding=1), nn.ReLU(inplace=True)]
                c = ch
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
        hidden = max(1, int(round(512 * width_multiplier)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(), CurveLinear(c * h * w, hidden, num_bends, fixed), nn.ReLU(inplace=True),
            nn.Dropout(), CurveLinear(hidden, hidden, num_bends, fixed), nn.ReLU(inplace=True),
            CurveLinear(hidden, num_classes, num_bends, fixed))

    def body(self, x, coeffs):
        x = _run(self.features, x, coeffs)
        return _run(self.classifier, torch.flatten(x, 1), coeffs)


class _CurveBlock(nn.Module):
    def __init__(self, cin, planes, stride, num_bends, fixed):
        super().__init__()
        self.bn1 = CurveBatchNorm2d(cin, num_bends, fixed)
        self.conv1 = CurveConv2d(cin, planes, 3, num_bends, fixed, stride, 1, bias=False)
        self.bn2 = CurveBatchNorm2d(planes, num_bends, fixed)
        self.conv2 = CurveConv2d(planes, planes, 3, num_bends, fixed, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.ModuleList([CurveConv2d(cin, planes, 1, num_bends, fixed, stride, bias=False)])

    def forward(self, x, coeffs):
        pre = self.relu(self.bn1(x, coeffs))
        residual = x if self.downsample is None else self.downsample[0](pre, coeffs)
        out = self.conv1(pre, coeffs)
        out = self.conv2(self.relu(self.bn2(out, coeffs)), coeffs)
        out += residual
        return out


class CurvePreResNet(CurveNet):
    """The zoo's preresnet (basic blocks, shortcut on the pre-activation) as per-layer curve layers."""

    def __init__(self, input_shape=(3, 32, 32), num_classes=10, depth=20, num_bends=3, fixed=(True, False, True)):
        super().__init__()
        self.num_bends, fixed = num_bends, list(fixed)
        n = (depth - 2) // 6
        self.conv1 = CurveConv2d(input_shape[0], 16, 3, num_bends, fixed, 1, 1, bias=False)
        cin = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], 1):
            blocks = []
            for j in range(n):
                blocks.append(_CurveBlock(cin, planes, stride if j == 0 else 1, num_bends, fixed))
                cin = planes
            setattr(self, f"layer{i}", nn.ModuleList(blocks))
        self.bn = CurveBatchNorm2d(64, num_bends, fixed)
        self.fc = CurveLinear(64, num_classes, num_bends, fixed)

    def body(self, x, coeffs):
        x = self.conv1(x, coeffs)
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                x = block(x, coeffs)
        x = F.relu(self.bn(x, coeffs), inplace=True)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x, coeffs)


class RefVGG16(nn.Module):
    """Plain VGG16 for 32x32 as the reference code writes it: convs with in-place ReLUs, five pools."""

    def __init__(self, num_classes=10, width_multiplier: float = 1.0):
        super().__init__()
        layers: List[nn.Module] = []
        c = 3
        for stage in VGG_CONFIGS[16]:
            for ch in stage:
                ch = max(1, int(round(ch * width_multiplier)))
                layers += [nn.Conv2d(c, ch, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c = ch
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        h = max(1, int(round(512 * width_multiplier)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(), nn.Linear(c, h), nn.ReLU(True), nn.Dropout(), nn.Linear(h, h), nn.ReLU(True),
            nn.Linear(h, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class _RefBlock(nn.Module):
    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = self.relu(self.bn1(x))
        residual = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out += residual
        return out


class RefPreResNet(nn.Module):
    """Plain PreResNet (basic blocks) for 32x32 as the reference code writes it (AvgPool2d(8), in-place)."""

    def __init__(self, num_classes=10, depth=20):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        cin = 16
        for i, (planes, stride) in enumerate([(16, 1), (32, 2), (64, 2)], 1):
            blocks = []
            for j in range(n):
                blocks.append(_RefBlock(cin, planes, stride if j == 0 else 1))
                cin = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(self.relu(self.bn(x)))
        return self.fc(x.view(x.size(0), -1))


@torch.no_grad()
def load_bends(net: CurveNet, bends_by_name) -> CurveNet:
    """Copy ``CurveModel.bends_by_name()`` (name -> [K, *shape]) into the per-layer bends of ``net``."""
    own = dict(net.named_parameters())
    for name, stacked in bends_by_name.items():
        mod, _, attr = name.rpartition(".")
        for k in range(stacked.shape[0]):
            own[f"{mod}.{attr}_{k}"].copy_(stacked[k])
    return net


def garipov_step_fn(net: CurveNet, x, y, weight_decay=5e-4, lr=0.01, momentum=0.9):
    """One training step as Garipov et al.'s train loop: random t, CE + 0.5*wd*l2, SGD on the free bends."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    net.train()
    gen = torch.Generator().manual_seed(0)

    def step():
        t = torch.rand((), generator=gen)
        loss = F.cross_entropy(net(x, t), y) + 0.5 * weight_decay * net.l2()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step
