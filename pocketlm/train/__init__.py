"""Fine-tuning and distillation: one trainer, data loading, LoRA, checkpoints.

>>> from pocketlm.train import finetune, distill, load_data, TrainSettings
"""

from pocketlm.train.data import load_data
from pocketlm.train.steps import distill, finetune
from pocketlm.train.trainer import TrainSettings, train

__all__ = ["TrainSettings", "distill", "finetune", "load_data", "train"]
