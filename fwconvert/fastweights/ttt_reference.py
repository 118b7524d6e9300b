"""In-place TTT reference definitions (see reference.py)."""
__all__ = []
