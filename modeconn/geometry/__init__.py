"""The geometry of the loss surface: directions, planes, 1-D / 2-D grids, Hessian and sharpness.

Example::

    from modeconn.geometry import random_plane, evaluate_grid, flatten_parameters
    plane = random_plane(flatten_parameters(model), model, dims=2, norm="filter", seed=0)
    grid = evaluate_grid(model, plane, xs=np.linspace(-1, 1, 21), ys=np.linspace(-1, 1, 21),
                         train_loader=ds.eval_loader("train"), test_loader=ds.eval_loader("test"))
    grid.arrays["train_loss"][j, i]      # at (xs[i], ys[j])

Flat vectors are in the :class:`~modeconn.core.layout.FlatLayout` of the
architecture. Commands: ``python -m modeconn.landscape`` (slices around a
model) and ``python -m modeconn.plane`` (the plane of a fitted curve).
"""
from modeconn.geometry.curvature import curvature_metrics
from modeconn.geometry.sharpness import (EpsilonSharpness, SharpnessReport, epsilon_sharpness, sharpness_report,
                                         slice_curvature)
from modeconn.geometry.directions import (NORMS, Plane, flatten_parameters, model_direction, normalize_direction,
                                          orthogonalize, plane_through, random_direction, random_plane)
from modeconn.geometry.ntk import NTKTracker, empirical_ntk, kernel_alignment, kernel_distance, kernel_velocity
from modeconn.geometry.grid import (CurvePlane, GridResult, axis, curve_plane, curve_plane_geometry, evaluate_grid,
                                    evaluator_for, plane_checksum)

__all__ = ["NORMS", "Plane", "flatten_parameters", "model_direction", "normalize_direction", "orthogonalize",
           "plane_through", "random_direction", "random_plane", "CurvePlane", "GridResult", "axis", "curve_plane",
           "curve_plane_geometry", "evaluate_grid", "evaluator_for", "plane_checksum", "curvature_metrics",
           "EpsilonSharpness", "SharpnessReport", "epsilon_sharpness", "sharpness_report", "slice_curvature",
           "empirical_ntk", "kernel_distance", "kernel_velocity", "kernel_alignment", "NTKTracker"]
