"""Prediction maps, Cityscapes submission files, and model export.

Only modules built on the core dependencies (numpy, Pillow, torch) are imported here; the export module, which
needs optional packages, is imported on use (``from cskd.outputs import export``).
"""

from .cityscapes import cityscapes_key, submission_filename, train_ids_to_label_ids, write_submission
from .maps import blend, colorize, colorize_rgb, default_palette, make_panel, palette_lut

__all__ = [
    "blend", "cityscapes_key", "colorize", "colorize_rgb", "default_palette", "make_panel", "palette_lut",
    "submission_filename", "train_ids_to_label_ids", "write_submission",
]
