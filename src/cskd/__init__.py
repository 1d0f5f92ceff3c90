"""cskd: knowledge distillation for semantic segmentation.

The package is a small library with a thin CLI on top (``cskd --help``). Every module, by package:

- :mod:`cskd.models`       the networks
  ``segmentor`` (Segmentor, SegOutput, build_segmentor), ``heads`` (DeepLabV3 / PSP / FCN heads),
  ``backbones/`` (dilated ResNet-v1s, MobileNetV2 at output stride 8), ``fusion`` (BatchNorm folding),
  ``complexity`` (parameters, FLOPs)
- :mod:`cskd.checkpoints`  weights on disk: ``files`` (safe_load, atomic_save, RNG states), ``weights`` (fitting
  weights into a model), ``official`` (the published key layout), ``loading`` (a model from any checkpoint)
- :mod:`cskd.losses`       distillation losses, one module per method (``kd``, ``cwd``, ``cskd``, ``cirkd``, ``skd``,
  ``ifvd``, ``at``, ``fitnet``), built by name (``base``: DistillLoss, register_loss); ``methods`` (METHODS: a
  method is a list of losses), ``cka`` and ``attention`` (CSKD's parts), ``_numerics`` (compute dtype,
  autocast off, float32-result products)
- :mod:`cskd.data`         ``datasets`` (standard layouts), ``info`` (classes, palettes, label tables),
  ``cityscapes_labels``, ``io`` (image / label decoding), ``transforms`` (joint image + mask augmentation),
  ``normalize``, ``synthetic`` and ``_street`` (the synthetic street scenes), ``check`` (scanning a split)
- :mod:`cskd.engine`       training: ``config`` (the experiment config), ``step`` (StepModule: one step's forward),
  ``runner`` (StepRunner: models, optimiser, precision, the step), ``trainer`` (Trainer: the loop), ``sampling``
  (seeded resumable batches), ``records`` (log.jsonl, TensorBoard, progress)
- :mod:`cskd.evaluation`   ``metrics`` (confusion matrix, mIoU), ``inference`` (whole / slide / multi-scale + flip),
  ``evaluate`` (a model over a split)
- :mod:`cskd.outputs`      what a prediction is written as: ``maps`` (palette maps, overlays, panels), ``cityscapes``
  (submission files), ``writers`` (the ``cskd predict`` formats)
- :mod:`cskd.deploy`       ``graph``, ``wrapper``, ``exporters``, ``verification``, ``export`` (ONNX / TorchScript,
  verified against PyTorch), ``latency`` (the inference latency benchmark)
- :mod:`cskd.studies`      sets of runs: ``runs`` (what every study shares), ``demo`` (``cskd demo``), ``compare``
  (``cskd compare``)
- :mod:`cskd.cli`          one module per command (``train``, ``evaluate``, ``predict``, ``export``, ``convert``,
  ``info``, ``data``, ``demo``, ``compare``)
- top level: ``schema`` (typed keyword arguments checked against a signature or dataclass), ``distributed`` (process
  group, device, gathers), ``timing`` (timing device work, the measured environment), ``constants``, ``errors``
"""

__version__ = "0.1.0"
