"""Training from scratch: `train_from_config(path, resume=False, overrides=None)` (`diffusekit train`)."""
from .config import TrainConfig, load_config
from .trainer import Trainer, export_model, load_run, train_from_config

__all__ = ["TrainConfig", "load_config", "Trainer", "train_from_config", "export_model", "load_run"]
