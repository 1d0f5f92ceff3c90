"""Distillation methods by name: each is a list of registered losses with its published hyper-parameters.

An experiment config says ``method: cskd`` (or lists ``losses`` itself for a custom method); ``cskd compare`` and
``cskd demo`` take the same names. The recipes come from the published scripts: CSKD's ``sh_scripts`` (all
datasets alike) and the CIRKD repository's ``train_scripts`` (Cityscapes; its peers are published for Cityscapes
only, so on CamVid and VOC the same weights are an extrapolation, as in the CSKD paper's comparisons).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_CWD = {"name": "cwd", "weight": 3.0, "temperature": 2.0}
_KD = {"name": "kd", "weight": 1.0, "temperature": 1.0}
_ADV = {"name": "adv", "lambda_adv": 0.001, "lambda_d": 0.1}
_CSKD = {"name": "cskd", "lambda_cam": 0.3, "lambda_pam": 0.8, "temperature": 2.0, "pam_grid": 5,
         "pam_projection": "resample"}


@dataclass(frozen=True)
class Method:
    name: str
    losses: tuple[dict[str, Any], ...]
    description: str

    @property
    def is_distillation(self) -> bool:
        """The method has distillation losses, so it trains with a teacher."""
        return bool(self.losses)


def _m(name: str, description: str, *losses: dict[str, Any]) -> Method:
    return Method(name, tuple(dict(lc) for lc in losses), description)


METHODS: dict[str, Method] = {m.name: m for m in (
    _m("baseline", "the student alone: cross-entropy (+ 0.4 aux), no teacher"),
    _m("kd", "pixel-wise KD on the logits (Hinton et al.; λ 1, τ 1)", _KD),
    _m("cwd", "channel-wise distillation on the logits (Shu et al., ICCV 2021; λ 3, τ 2 as in CSKD's recipe)", _CWD),
    _m("cskd", "CSKD as published: CWD (λ 3, τ 2) + CAM (λ 0.3) + 5×5 grid PAM (λ 0.8) by CKA, τ_sa 2, PAM "
               "projections redrawn at every call", _CWD, _CSKD),
    _m("cskd_fixed", "CSKD with PAM projections drawn once from a seed and kept (reproducible)", _CWD,
       {**_CSKD, "pam_projection": "fixed"}),
    _m("cskd_cam", "CSKD ablation: CAM only (+ CWD)", _CWD, {**_CSKD, "lambda_pam": 0.0}),
    _m("cskd_pam", "CSKD ablation: grid PAM only (+ CWD)", _CWD, {**_CSKD, "lambda_cam": 0.0}),
    _m("cskd_mse", "CSKD ablation: MSE after a learned 1×1 connector instead of CKA (+ CWD)", _CWD,
       {**_CSKD, "similarity": "mse"}),
    _m("cskd_wholepam", "CSKD ablation: PAM over the whole map instead of a 5×5 grid (+ CWD)", _CWD,
       {**_CSKD, "pam_grid": 1}),
    _m("cirkd", "CIRKD (Yang et al., CVPR 2022): KD + mini-batch pixel relations (1) + pixel (0.1) and region "
                "(0.1) memory relations", _KD, {"name": "cirkd"}),
    _m("skd", "structured KD (Liu et al., CVPR 2019) as published: KD + pair-wise (λ 10) + holistic adversarial "
              "term (λ_adv 0.001, discriminator λ_d 0.1, its own Adam 4e-4, β (0.9, 0.99))", _KD,
       {"name": "skd", "weight": 10.0}, _ADV),
    _m("skd_noadv", "SKD without its adversarial term: KD + pair-wise (λ 10)", _KD,
       {"name": "skd", "weight": 10.0}),
    _m("ifvd", "IFVD (Wang et al., ECCV 2020) as published: KD + intra-class variation (λ 20) + SKD's adversarial "
               "term (λ_adv 0.001, λ_d 0.1)", _KD, {"name": "ifvd", "weight": 20.0}, _ADV),
    _m("ifvd_noadv", "IFVD without its adversarial term: KD + intra-class variation (λ 20)", _KD,
       {"name": "ifvd", "weight": 20.0}),
    _m("afdcd", "Af-DCD (Fan et al., NeurIPS 2023): KD + masked reconstruction of the teacher's c4 through the "
                "enhanced projector (λ_fd 2e-6, centre mask) + omni-contrastive term (λ_ctr 0.005, τ 0.07, M 16, "
                "pool 4, 4×4 patches); the Cityscapes R18 recipe", _KD, {"name": "afdcd"}),
    _m("at", "attention transfer (Zagoruyko & Komodakis): KD + AT (λ 10000, p 2)", _KD,
       {"name": "at", "weight": 10000.0, "p": 2.0}),
    _m("fitnet", "FitNet (Romero et al.): KD + feature regression through a 1×1 connector (λ 10)", _KD,
       {"name": "fitnet", "weight": 10.0}),
    _m("dist", "DIST (Huang et al., NeurIPS 2022): inter- and intra-class Pearson relations of the softmax on the "
               "logits (β 1, γ 1, τ 1, λ 1) + 0.4× the same on the aux logits; replaces KD", {"name": "dist"}),
    _m("dsd", "DSD (Feng et al., TIP 2021): pixel similarity of aux/feature/logit attention residuals (λ 1000) + "
              "category similarity of the logits (λ 10, τ 4), alone as in CIRKD's train_dsd.sh", {"name": "dsd"}),
    _m("cirkdv2", "CIRKDV2 (CIRKD's scripts/train_cirkdv2, DeepLabV3-R18): KD + GCN + FitNet (1) + CIRKD pixel/region "
                  "relations (1, 0.1, 0.1) + channel relations: mini-batch (1), memory (0.1), channel KD (100)",
       _KD, {"name": "cirkdv2"}),
    _m("cirkdv2_fitnet10", "CIRKDV2 with FitNet weight 10 (the published VOC and PSPNet-MobileNetV3 scripts)", _KD,
       {"name": "cirkdv2", "fitnet_weight": 10.0}),
    _m("featkd", "feature KD (the 2026 budget-matched study): MSE of the student's features through a learned 1×1 "
                 "connector onto the teacher's (λ 1), no logit KD", {"name": "featkd"}),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
