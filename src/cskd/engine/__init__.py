"""The engine: experiment configs and the one training loop every method runs through."""

from .config import (
    BudgetConfig, DataConfig, EvalConfig, ExperimentConfig, LossConfig, ModelConfig, TrainConfig, config_from_dict,
    load_config,
)
from .step import StepModule, segmentation_ce
from .runner import StepRunner
from .trainer import TrainResult, Trainer, train

__all__ = [
    "BudgetConfig", "DataConfig", "EvalConfig", "ExperimentConfig", "LossConfig", "ModelConfig", "TrainConfig",
    "StepModule", "StepRunner", "TrainResult", "Trainer", "config_from_dict", "load_config", "segmentation_ce", "train",
]
