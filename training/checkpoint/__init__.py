"""Checkpoints: saving and resuming across ranks (save), consolidated weights for inference and export
(export), the layout-independent state (portable) and offline conversion to another layout (reshard)."""
