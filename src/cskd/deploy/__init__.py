"""Deployment: a segmentor's inference graph as ONNX or TorchScript, verified against PyTorch, and its latency.

- :mod:`cskd.deploy.graph`         graph rewriting: no aux head, pyramid poolings that export at any size
- :mod:`cskd.deploy.wrapper`       the inference graph (normalise → segmentor → resize → argmax) and its options
- :mod:`cskd.deploy.exporters`     ONNX / TorchScript writers, and runners that load the files back
- :mod:`cskd.deploy.verification`  the exported model against eager PyTorch: inputs, comparison, tolerance
- :mod:`cskd.deploy.export`        the whole job (``cskd export``): rewrite, write, verify, keep or remove
- :mod:`cskd.deploy.latency`       per-image latency of the graph: eager, compiled, ONNX Runtime
  (``cskd bench-latency``)

Nothing is imported here: the exporters need optional packages (``pip install 'cskd[onnx]'``).
"""
