"""FWL reference definitions (see reference.py)."""
__all__ = []
