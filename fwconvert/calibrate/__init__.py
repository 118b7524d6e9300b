"""Calibration: local data, the meta-learning loop over fast-weight parameters, checkpoints, DDP.

``calibrate(model_path, data, out, settings)`` (run.py) is the entry point the CLI uses; the pieces
(``load_documents``, ``WindowSampler``, ``Calibrator``, ``select_trainable``) are usable on their own.
"""
from .data import Document, WindowSampler, load_documents, split_documents
from .loop import CalibrationSettings, Calibrator, sequence_loss
from .params import select_trainable

__all__ = ["Document", "WindowSampler", "load_documents", "split_documents", "CalibrationSettings",
           "Calibrator", "sequence_loss", "select_trainable"]
