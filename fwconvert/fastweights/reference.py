"""Slow, obviously-correct reference definitions of each mechanism (used by tests and verify only).

The definitions live beside their owners (``fwl_reference.py``, ``ttt_reference.py``); this module
is the one import point. Every reference function name ends in ``_ref``.
"""
from .fwl_reference import *  # noqa: F401,F403
from .ttt_reference import *  # noqa: F401,F403
