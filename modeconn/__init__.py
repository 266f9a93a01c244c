"""modeconn: mode connectivity for your own PyTorch models.

Fit low-loss curves between two trained networks and simplexes connecting
several, measure loss barriers along any path, align neurons before fitting,
build Fast Geometric Ensembles, and draw the loss landscape around them.
"""
from modeconn._version import __version__
from modeconn.runtime import Hooks, Runtime
from modeconn.core.curves import Bezier, Curve, PolyChain, make_curve
from modeconn.core.curve_model import CurveModel, chain_path, linear_path, load_curve, save_curve
from modeconn.core.simplex import SimplexModel, barycentric_grid, load_simplex, save_simplex, uniform_simplex
from modeconn.runtime.checkpoints import (CheckpointError, load_checkpoint, load_model, load_state_dict,
                                          save_checkpoint, save_model)
from modeconn.data import TensorLoader, get_dataset
from modeconn.models import create_model, list_models, register_model
from modeconn.models.shipped import shipped_checkpoint
from modeconn.evaluation.bn import has_batchnorm, recompute_bn
from modeconn.evaluation.model import eager_attention
from modeconn.evaluation.path import PathResult, barrier, evaluate_path, evaluate_points
from modeconn.evaluation.ensembles import EnsembleResult, curve_ensemble, evaluate_ensemble, simplex_ensemble
from modeconn.evaluation.simplex import SimplexResult, evaluate_simplex
from modeconn.training.loop import fit_curve, train_model
from modeconn.training.fge import FGEResult, FGESnapshots, train_fge
from modeconn.training.simplex import fit_simplex
from modeconn.training.schedules import FGELR, cyclic_lr
from modeconn.training.sam import SAM
from modeconn.geometry.sharpness import SharpnessReport, sharpness_report
from modeconn.training.spawn import SpawnResult, spawn_children
from modeconn.evaluation.adversarial import PGD, pgd_attack, robust_evaluate, robust_path
from modeconn.alignment.pam import PAMResult, pam_fit, permutation_update, proximal_weight_matching
from modeconn.core.param_groups import parameter_groups
from modeconn.evaluation.layerwise import LayerwiseResult, layerwise_barriers
from modeconn.geometry.sharpness import ModuleCurvature, module_curvature
from modeconn.alignment.repair import Repair, RepairReport, evaluate_repaired_path, repair
from modeconn.geometry.ntk import NTKTracker, empirical_ntk, kernel_alignment, kernel_distance, kernel_velocity
from modeconn.alignment.rescale import canonical_scale
from modeconn.hf.models import LMLogits, load_model_dir, save_model_dir
from modeconn.hf.text import text_dataset
from modeconn.alignment import (PermutationSpec, activation_matching, align_models, apply_permutation,
                                infer_permutation_spec, weight_matching)

__all__ = [
    "__version__", "Runtime", "Hooks",
    "Bezier", "PolyChain", "Curve", "make_curve",
    "CurveModel", "linear_path", "chain_path", "save_curve", "load_curve",
    "SimplexModel", "uniform_simplex", "barycentric_grid", "save_simplex", "load_simplex",
    "fit_simplex", "evaluate_simplex", "SimplexResult", "simplex_ensemble",
    "CheckpointError", "load_checkpoint", "save_checkpoint", "load_model", "save_model", "load_state_dict",
    "get_dataset", "TensorLoader",
    "create_model", "list_models", "register_model", "shipped_checkpoint",
    "recompute_bn", "has_batchnorm", "eager_attention",
    "evaluate_path", "evaluate_points", "PathResult", "barrier",
    "evaluate_ensemble", "curve_ensemble", "EnsembleResult",
    "train_model", "fit_curve", "train_fge", "FGELR", "FGESnapshots", "cyclic_lr", "FGEResult", "SAM",
    "sharpness_report", "SharpnessReport",
    "spawn_children", "SpawnResult",
    "empirical_ntk", "kernel_distance", "kernel_velocity", "kernel_alignment", "NTKTracker",
    "PermutationSpec", "infer_permutation_spec", "apply_permutation", "weight_matching", "activation_matching",
    "align_models", "canonical_scale",
    "PGD", "pgd_attack", "robust_evaluate", "robust_path",
    "pam_fit", "PAMResult", "permutation_update", "proximal_weight_matching",
    "repair", "Repair", "RepairReport", "evaluate_repaired_path",
    "layerwise_barriers", "LayerwiseResult", "parameter_groups", "module_curvature", "ModuleCurvature",
    "empirical_ntk", "kernel_distance", "kernel_velocity", "kernel_alignment", "NTKTracker",
    "LMLogits", "load_model_dir", "save_model_dir", "text_dataset",
]
