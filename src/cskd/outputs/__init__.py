"""What a prediction is written as: palette maps, overlays, panels, Cityscapes submission files.

Model export (ONNX / TorchScript) and its latency benchmark are :mod:`cskd.deploy`.
"""

from .cityscapes import cityscapes_key, submission_filename, train_ids_to_label_ids, write_submission
from .maps import blend, colorize, colorize_rgb, default_palette, make_panel, palette_lut

__all__ = [
    "blend", "cityscapes_key", "colorize", "colorize_rgb", "default_palette", "make_panel", "palette_lut",
    "submission_filename", "train_ids_to_label_ids", "write_submission",
]
