"""Models the tests share."""

import torch

from htmlgen_utils.config import Config
from htmlgen_utils.model import load_for_training


def adapted_tiny_model():
    """The tiny base with a LoRA that changes its pages (random B matrices), in eval mode, for generation."""
    model, tokenizer = load_for_training(Config.from_preset("tiny"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    return model.eval(), tokenizer
