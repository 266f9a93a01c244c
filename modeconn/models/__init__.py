"""Model zoo: plain ``nn.Module`` classifiers built by name.

    >>> from modeconn.models import create_model, list_models
    >>> model = create_model("preresnet", (3, 32, 32), 10, depth=20)

Every model:
- takes a batch ``[B, *input_shape]`` and returns logits ``[B, num_classes]``;
- is traceable by ``torch.fx.symbolic_trace`` (all sizes fixed at construction; the
  transformers read only the batch and sequence length from their input, ``x.size(i)``);
- uses no in-place ops (safe under ``torch.func.functional_call`` / ``vmap``), except
  the ReLUs of ``vgg*`` and ``preresnet``, in place as in their reference code: each
  overwrites a tensor only the model made and nothing else reads (a layer's output
  whose backward does not need it; a forward hook on that layer that keeps the output
  instead of reading it at once finds it rectified); residual adds are ``out = out + shortcut``,
  flattening is ``torch.flatten(x, 1)``;
- has deterministic parameter names (``nn.Sequential`` / named submodules).

``gpt`` reads token ids ``long [B, seq_len]`` (``input_shape = (seq_len,)``);
its ``vocab`` comes from the dataset (``Dataset.vocab_size``).

Register your own with ``@register_model("name")`` on a
``fn(input_shape, num_classes, **kwargs) -> nn.Module``.
"""
from modeconn.models.registry import create_model, list_models, register_model
from modeconn.models.shipped import shipped_checkpoint

# importing the family modules registers their models
from modeconn.models.mlp import MLP
from modeconn.models.convnet import ConvNet
from modeconn.models.cnn1d import CNN1d
from modeconn.models.vgg import VGG
from modeconn.models.preresnet import PreResNet
from modeconn.models.wide_resnet import WideResNet
from modeconn.models.transformer import GPT

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "shipped_checkpoint",
    "MLP",
    "ConvNet",
    "CNN1d",
    "VGG",
    "PreResNet",
    "WideResNet",
    "GPT",
]
