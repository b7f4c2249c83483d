"""ShapeWorld: the embedded default world (prompts, renderer, exact detector, tiny SD3 model)."""
from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
