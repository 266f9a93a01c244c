"""Pictures of modeconn's results, one module per kind of result.

Every function draws with matplotlib's object API (``Figure``, never pyplot),
so importing this package leaves the matplotlib backend and pyplot's global
state alone; each writes one PNG atomically and returns its path.

  history    training history                    :func:`plot_history`
  path       metrics along a path                :func:`plot_path`
  landscape  1-D/2-D grids, surface, curve plane,
             curvature                           :func:`plot_line`, :func:`plot_contours`,
                                                 :func:`plot_surface`, :func:`plot_curve_plane`,
                                                 :func:`plot_curvature`
  ensemble   Fast Geometric Ensembling           :func:`plot_fge`
  simplex    a simplex or complex, face by face  :func:`plot_simplex`
  sharpness  1-D slices of several models        :func:`plot_sharpness_slices`
  spawn      barrier between children vs epoch   :func:`plot_spawn`
  robustness clean vs robust loss along paths    :func:`plot_robust_paths`
  layers     one bar per layer (layer-wise
             barriers, per-module curvature)     :func:`plot_group_bars`
  ntk        NTK distance / velocity vs epoch    :func:`plot_ntk`
"""
from modeconn.plots.ensemble import plot_fge
from modeconn.plots.history import plot_history
from modeconn.plots.layers import plot_group_bars
from modeconn.plots.landscape import plot_contours, plot_curvature, plot_curve_plane, plot_line, plot_surface
from modeconn.plots.ntk import plot_ntk
from modeconn.plots.path import plot_path
from modeconn.plots.robustness import plot_robust_paths
from modeconn.plots.sharpness import plot_sharpness_slices
from modeconn.plots.simplex import plot_simplex
from modeconn.plots.spawn import plot_spawn

__all__ = ["plot_history", "plot_path", "plot_line", "plot_contours", "plot_surface", "plot_curve_plane",
           "plot_curvature", "plot_fge", "plot_simplex", "plot_sharpness_slices", "plot_spawn",
           "plot_group_bars", "plot_ntk",
           "plot_robust_paths"]
