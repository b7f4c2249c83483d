"""Importing this module registers every reward (heavy dependencies are imported lazily inside them)."""
from . import shapeworld  # noqa: F401
