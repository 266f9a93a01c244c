"""modeconn: mode connectivity for your own PyTorch models.

Fit low-loss curves between two trained networks, measure loss barriers along
any path, align neurons before fitting, build Fast Geometric Ensembles, and
draw the loss landscape around them.
"""
__version__ = "0.1.0"

from .curves import Bezier, PolyChain, Curve, make_curve  # noqa: E402
from .curve_model import CurveModel, linear_path, chain_path, save_curve, load_curve  # noqa: E402
from .checkpoint import (CheckpointError, load_checkpoint, save_checkpoint, load_model,  # noqa: E402
                         save_model, load_state_dict)
from .data import get_dataset, TensorLoader  # noqa: E402
from .bn import recompute_bn, has_batchnorm  # noqa: E402
from .training import train_model, fit_curve  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402

__all__ = [
    "Bezier", "PolyChain", "Curve", "make_curve", "CurveModel", "linear_path", "chain_path", "save_curve", "load_curve",
    "CheckpointError", "load_checkpoint", "save_checkpoint", "load_model", "save_model",
    "load_state_dict", "get_dataset", "TensorLoader", "recompute_bn", "has_batchnorm",
    "train_model", "fit_curve", "create_model", "list_models", "register_model",
]
from .path import evaluate_path, evaluate_points, PathResult, barrier  # noqa: E402

__all__ += ["evaluate_path", "evaluate_points", "PathResult", "barrier"]
from .alignment import (PermutationSpec, infer_permutation_spec, apply_permutation,  # noqa: E402
                        weight_matching, activation_matching, align)

__all__ += ["PermutationSpec", "infer_permutation_spec", "apply_permutation", "weight_matching",
            "activation_matching", "align"]
from .ensembles import fge, evaluate_ensemble, curve_ensemble, cyclic_lr, FGEResult, EnsembleResult  # noqa: E402

__all__ += ["fge", "evaluate_ensemble", "curve_ensemble", "cyclic_lr", "FGEResult", "EnsembleResult"]
