"""The DeepSeek-V3 model in plain PyTorch, one module per concept."""

from megads.model.config import ModelConfig, RopeScalingConfig, count_parameters
from megads.model.linear import GroupedLinear, LinearFactory
from megads.model.transformer import DeepseekV3, LossOutput, ModelOutput, loss_from_output, total_loss

__all__ = [
    "DeepseekV3",
    "GroupedLinear",
    "LinearFactory",
    "LossOutput",
    "ModelConfig",
    "ModelOutput",
    "RopeScalingConfig",
    "count_parameters",
    "loss_from_output",
    "total_loss",
]
