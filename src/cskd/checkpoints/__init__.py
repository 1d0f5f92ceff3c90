"""Checkpoint I/O: files written atomically and read safely, weights fitted into models, the published layout.

- :mod:`cskd.checkpoints.files`     ``safe_load`` (``weights_only=True``), ``atomic_save``, RNG states for a resume
- :mod:`cskd.checkpoints.weights`   weights into a segmentor / backbone / teacher, with errors listing what does not fit
- :mod:`cskd.checkpoints.official`  the published CSKD/CIRKD key layout ↔ cskd's (``cskd convert``)
- :mod:`cskd.checkpoints.loading`   a segmentor rebuilt from any checkpoint kind (``cskd eval / predict / export``)
"""

from .files import atomic_save, capture_rng, restore_rng, safe_load
from .loading import LoadedModel, load_model
from .official import backbone_state_dict, from_official, is_official_layout, official_model_name, to_official
from .weights import check_fit, extract_state_dict, load_backbone_weights, load_teacher_weights, load_weights

__all__ = [
    "LoadedModel", "atomic_save", "backbone_state_dict", "capture_rng", "check_fit", "extract_state_dict",
    "from_official", "is_official_layout", "load_backbone_weights", "load_model", "load_teacher_weights",
    "load_weights", "official_model_name", "restore_rng", "safe_load", "to_official",
]
