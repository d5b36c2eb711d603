"""Merge methods: small registered functions with declared parameters.

A method merges one module at a time. It receives the weighted inputs that hold the module
(:class:`Term`) and a :class:`ModuleContext`, and returns factors (up m×k, down k×n) whose
product is the merged ΔW (scale folded in). Register a method with :func:`register`; the
CLI, recipes and the Python API all find it in :data:`METHODS`.
"""

from .registry import METHODS, Method, ModuleContext, Param, Term, check_number, get_method, register  # noqa: F401

from . import learned, linear, sparsify, spectral  # noqa: E402,F401  (each module registers its methods)
