"""What spec inference knows about torch operations, grouped by how they act on channels.

Plain data, no logic. Each table lists modules (matched by class, subclasses
included), functions (``call_function`` targets) or tensor methods
(``call_method`` names) that treat every channel the same way, so they commute
with a permutation of the channels in the way their table says:

* elementwise ops (activations, unary maths, casts, binary arithmetic) act on
  each entry alone;
* spatial ops (pooling, padding, resampling) act only on the trailing spatial
  dimensions, given by the number stored with each entry;
* reshapes, transposes, concatenation and reductions only move or combine
  entries, and :mod:`modeconn.alignment.channel_layout` says where a channel
  ends up.

An operation in no table is unsupported: the channel groups that reach it are
left unpermuted, with a reason.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ modules
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold,
)
IDENTITY_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# softmax over any dimension: per-channel when taken over another dimension, and
# permutation-equivariant when taken over the channels themselves
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
# module -> number of trailing spatial dimensions it acts on
SPATIAL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1, nn.LPPool2d: 2,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3,
    nn.ConstantPad1d: 1, nn.ConstantPad2d: 2, nn.ConstantPad3d: 3,
    nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3,
}
CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
CONV_TRANSPOSE_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
INSTANCE_NORM_MODULES = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}

# ---------------------------------------------------- functions and methods
ACTIVATION_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu,
    F.leaky_relu, F.elu, F.selu, torch.selu, F.celu, F.silu, F.mish, F.softplus, F.hardswish,
    F.hardtanh, F.hardsigmoid, F.logsigmoid, F.softsign, F.tanhshrink, F.threshold,
}
ACTIVATION_METHODS = {"relu", "sigmoid", "tanh"}
UNARY_FUNCTIONS = {
    torch.abs, torch.neg, operator.neg, operator.pos, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.square, torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip,
}
UNARY_METHODS = {"abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "clamp", "clip", "erf"}
CAST_METHODS = {"float", "double", "half", "bfloat16", "to", "type_as"}
IDENTITY_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
}
COPY_METHODS = {"contiguous", "clone", "detach"}
SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
# function -> number of trailing spatial dimensions it acts on
POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3,
    F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.lp_pool1d: 1, F.lp_pool2d: 2,
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3,
    torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}
# function -> number of spatial dimensions of the kernel
CONV_FUNCTIONS = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
}
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.pow,
}
BINARY_METHODS = {"add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum"}
RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
# reshapes whose target shape comes from a second tensor
RESHAPE_LIKE_METHODS = {"view_as", "reshape_as"}
# dimension orders: swap two dimensions, reverse a matrix, or a full permutation
SWAP_FUNCTIONS = {torch.transpose, torch.swapaxes, torch.swapdims}
SWAP_METHODS = {"transpose", "swapaxes", "swapdims"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
# queries that return plain numbers, not tensors carrying units
SIZE_METHODS = {"size", "dim", "numel", "nelement", "ndimension"}
SAFE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
