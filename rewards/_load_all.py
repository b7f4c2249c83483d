"""Importing this module registers every reward (heavy dependencies are imported lazily inside them)."""
from . import aesthetic, clipscore, geneval, hpsv2, imagereward, jpeg, ocr, pickscore, shapeworld  # noqa: F401
from . import artifact, shapeclip, shapevalue  # noqa: F401  (ShapeWorld learned proxies)
from . import exemplar  # noqa: F401  (DRAGON's distributional rewards)
