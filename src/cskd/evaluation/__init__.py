"""Metrics (one confusion matrix, reduced across ranks) and inference modes (whole, slide, multi-scale + flip)."""

from .evaluate import ShardSampler, collate_eval, eval_mode, evaluate, unwrap_model
from .inference import MODES, predict_logits, resolve_amp, window_starts
from .metrics import ConfusionMatrix, SegMetrics

__all__ = [
    "MODES", "ConfusionMatrix", "SegMetrics", "ShardSampler", "collate_eval", "eval_mode", "evaluate",
    "predict_logits", "resolve_amp", "unwrap_model", "window_starts",
]
