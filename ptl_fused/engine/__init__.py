"""Training engine of the PTL pipeline: configs, the trainer (state rules, AMP, DDP,
checkpoints with exact resume), sequential fine-tuning, STD distillation and the main job."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, load_config
from .trainer import load_teacher, run

__all__ = [
    "CheckpointError",
    "ConfigError",
    "load_checkpoint",
    "load_config",
    "load_teacher",
    "run",
    "save_checkpoint",
]
