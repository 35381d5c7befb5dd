"""Spare GPU memory spent on speed: layers whose activations fit are not checkpointed (a speed lever).

Gradient checkpointing keeps only each decoder layer's input and runs the layer's forward again during the
backward pass: forward 1 + recompute 1 + backward 2, so a quarter of a step's matmul work is recompute. A T4 is
bound by exactly that work. A layer left un-checkpointed keeps what its backward needs (when compiled, the
compiler keeps the matmul outputs and recomputes only the cheap element-wise ops) and skips the recompute.

`plan_recompute` is the memory model: from the block, the micro-batch and what is already on the GPU it estimates
the step's peak with every layer checkpointed, then how many layers' activations fit in the rest of
`Config.memory_budget_gib`. Its per-token figures were measured on the Llama-2-7B shape (bench/README.md) and are
expressed in hidden-size vectors, so they scale with the model. `memory_budget_gib = 0` (the `colab-t4-low-memory`
preset) checkpoints every layer: the smallest memory, for long blocks and small GPUs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..config import Config

GIB = 2**30
# Measured on the 7B shape with compiled layers (bench/results/2026-11-29_recompute_calibration_h200.json), per token
# of a micro-batch, in hidden-size vectors of the compute dtype (8 KiB each for Llama-2-7B in fp16), at 2,048 and
# 4,096 tokens (the larger of the two):
STEP_VECTORS = 77  # the step's own peak above the weights, every layer checkpointed (besides the checkpoints)
LAYER_VECTORS = 29  # what one un-checkpointed layer keeps until its backward (28.7 and 25.3 measured)
MARGIN_GIB = 0.5  # allocator fragmentation and what the estimate leaves out


@dataclass
class RecomputePlan:
    """How many decoder layers run without checkpointing, and the estimate behind it."""

    layers: int
    unchecked: int
    budget_gib: float
    estimate_gib: float  # the planned step's estimated peak
    per_layer_gib: float  # what each un-checkpointed layer adds

    @property
    def recompute_saved(self) -> float:
        """The share of the step's matmul work no longer done (a checkpointed layer's recompute is a quarter)."""
        return 0.25 * self.unchecked / max(1, self.layers)

    def __str__(self) -> str:
        return (f"{self.unchecked} of {self.layers} layers un-checkpointed ({self.per_layer_gib:.2f} GiB each; "
                f"estimated peak {self.estimate_gib:.1f} of a {self.budget_gib:g} GiB budget): "
                f"{self.recompute_saved:.0%} less matmul work a step")


def _decoder_layers(model) -> torch.nn.ModuleList:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model.layers


def plan_recompute(model, config: Config, device: torch.device, checkpoints_offloaded: bool) -> RecomputePlan:
    """The number of layers to leave un-checkpointed under `config.memory_budget_gib` (0 on CPU, without
    checkpointing, with a zero budget, or when the checkpoints are offloaded: that is for memory that is short)."""
    layers = len(_decoder_layers(model))
    budget = float(config.memory_budget_gib)
    if (budget <= 0 or not config.gradient_checkpointing or device.type != "cuda" or checkpoints_offloaded):
        return RecomputePlan(layers, 0, budget, 0.0, 0.0)
    from ..model import compute_dtype

    vector = model.config.hidden_size * compute_dtype(config.precision).itemsize
    tokens = config.micro_batch_size * config.block_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = min(budget, torch.cuda.get_device_properties(device).total_memory / GIB - 1.0)
    static = torch.cuda.memory_allocated(device) + trainable * (4 + 2)  # + fp32 gradients + 8-bit Adam's 2 moments
    step = tokens * vector * (STEP_VECTORS + layers)  # + the layer checkpoints, kept on the GPU
    per_layer = tokens * vector * LAYER_VECTORS
    room = budget * GIB - static - step - MARGIN_GIB * GIB
    unchecked = max(0, min(layers, int(room // per_layer)))
    estimate = (static + step + unchecked * per_layer) / GIB + MARGIN_GIB
    if estimate > budget:
        warnings.warn(f"A micro-batch of {config.micro_batch_size} x {config.block_size} tokens needs about "
                      f"{estimate:.1f} GiB with every layer checkpointed, over memory_budget_gib={budget:g}: lower "
                      f"micro_batch_size (raise gradient_accumulation_steps to keep the step) or use the "
                      f"colab-t4-low-memory preset", stacklevel=2)
    return RecomputePlan(layers, unchecked, round(budget, 2), round(estimate, 2), round(per_layer / GIB, 3))


def leave_layers_unchecked(model, count: int) -> None:
    """Turn gradient checkpointing off for the last `count` decoder layers (their backward runs first, so what
    they keep is freed first)."""
    layers = _decoder_layers(model)
    for index, layer in enumerate(layers):
        if index >= len(layers) - count:
            layer.gradient_checkpointing = False
