"""cskd: knowledge distillation for semantic segmentation.

The package is a small library with a thin CLI on top (``cskd --help``):

- :mod:`cskd.models`      backbones, heads and segmentors (checkpoint-compatible with the published CSKD/CIRKD code)
- :mod:`cskd.losses`      distillation losses (CSKD, CWD, KD and peers), one module per method
- :mod:`cskd.data`        datasets on their standard layouts, joint transforms, the synthetic street scenes
- :mod:`cskd.engine`      configs and the one training loop every method runs through
- :mod:`cskd.evaluation`  metrics and inference modes (whole, slide, multi-scale + flip)
- :mod:`cskd.outputs`     prediction maps, Cityscapes submission files, export to ONNX / TorchScript
"""

__version__ = "0.1.0"
