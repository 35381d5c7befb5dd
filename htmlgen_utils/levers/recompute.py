"""Spare GPU memory spent on speed: less checkpoint recompute where the activations fit (a speed lever).

Gradient checkpointing keeps only each decoder layer's input and runs the layer's forward again during the
backward pass. With frozen 4-bit weights the backward needs one matmul per forward matmul, so the recompute is
about a third of a step's matmul time (bench/RESULTS.md). A T4 is bound by
exactly that work. Two ways to spend memory on it:

- leave a layer un-checkpointed: it keeps everything its backward needs (~29 hidden-size vectors a token);
- with compiled layers, give the compiler an activation memory budget (`torch._functorch.config.
  activation_memory_budget`): it keeps the outputs that are expensive to redo (the matmuls') and recomputes the
  cheap rest inside the layer's backward. At 0.2 a layer keeps ~6 vectors and skips ~30% of its matmul recompute;
  at 0.8, ~20 vectors and nearly all of it.

`plan_recompute` is the memory model: from the block, the micro-batch and what is already on the GPU it estimates
the step's peak for each way and picks the one that removes the most recompute under `Config.memory_budget_gib`.
Its per-token constants were measured on the Llama-2-7B shape (`recompute_calibration.py`, `layer_recompute.py`;
the results in bench/RESULTS.md) and are expressed in hidden-size vectors, so they scale with the model.
`memory_budget_gib = 0` (the `colab-t4-low-memory` preset) checkpoints every layer: the least memory, for long
blocks and small GPUs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch._functorch.config as functorch_config

from ..config import Config

GIB = 2**30
# Of a step's matmul time with every layer checkpointed, the share that is recompute (the 7B shape at 4,096 tokens,
# against no checkpointing; bench/RESULTS.md).
RECOMPUTE_SHARE = 0.31
# Per token of a micro-batch, in hidden-size vectors of the compute dtype (8 KiB each for Llama-2-7B in fp16), the
# larger of 2,048 and 4,096 tokens (bench/RESULTS.md):
STEP_OTHER_VECTORS = 30  # the step's peak above the weights besides the layers (loss chunk, head, allocator)
MARGIN_GIB = 0.5  # allocator fragmentation and what the estimate leaves out


@dataclass(frozen=True)
class LayerRecompute:
    """One way to run an un-checkpointed layer: what it keeps until its backward, the peak of its backward, and
    the share of its checkpoint recompute's matmul time it removes."""

    activation_budget: float | None  # the compiler's; None = it keeps what it likes (or the layer is eager)
    kept_vectors: float
    backward_peak_vectors: float
    recompute_removed: float


UNCHECKPOINTED = LayerRecompute(None, 29.3, 47.7, 1.0)
# With compiled layers (a 7B layer at 4,096 tokens). The share removed at 0.2 and 0.1 is what the whole model
# showed, below what one layer alone did (0.1's scaled as 0.2's was). That model ran block-sparse attention, which a
# T4 does not; the lone layer, with plain causal attention, removed more, so on a T4 these may be low
# (bench/RESULTS.md).
BUDGETED = [
    LayerRecompute(0.8, 20.2, 44.0, 0.97),
    LayerRecompute(0.2, 5.8, 42.7, 0.30),
    LayerRecompute(0.1, 2.8, 42.7, 0.17),
]
CHECKPOINTED_BACKWARD_PEAK = 47.4  # a checkpointed layer's backward: its recompute's activations and gradients


@dataclass
class RecomputePlan:
    """How many decoder layers run without checkpointing, how, and the estimate behind it."""

    layers: int
    unchecked: int
    budget_gib: float
    estimate_gib: float  # the planned step's estimated peak
    per_layer_gib: float  # what each un-checkpointed layer adds
    way: LayerRecompute = UNCHECKPOINTED

    @property
    def activation_budget(self) -> float | None:
        """The compiler's activation memory budget for the layers, or None for its default."""
        return self.way.activation_budget if self.unchecked else None

    @property
    def recompute_saved(self) -> float:
        """The share of the step's matmul time no longer spent on recompute."""
        return RECOMPUTE_SHARE * self.way.recompute_removed * self.unchecked / max(1, self.layers)

    def __str__(self) -> str:
        how = (
            f", the compiler recomputing their cheap parts (activation budget {self.activation_budget:g})"
            if self.activation_budget is not None
            else ""
        )
        return (
            f"{self.unchecked} of {self.layers} layers un-checkpointed{how} ({self.per_layer_gib:.2f} GiB "
            f"each; estimated peak {self.estimate_gib:.1f} of a {self.budget_gib:g} GiB budget): "
            f"~{self.recompute_saved:.0%} less matmul time a step"
        )


def _decoder_layers(model) -> torch.nn.ModuleList:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model.layers


def plan_recompute(
    model, config: Config, device: torch.device, checkpoints_offloaded: bool, compiled: bool | None = None
) -> RecomputePlan:
    """The layers to leave un-checkpointed under `config.memory_budget_gib`, and how (0 on CPU, without
    checkpointing, with a zero budget, or when the checkpoints are offloaded: that is for memory that is short).
    `compiled` (default: whether `config.compile_training` is on here) says whether the layers will be compiled,
    which allows the compiler's activation budgets."""
    layers = len(_decoder_layers(model))
    budget = float(config.memory_budget_gib)
    if budget <= 0 or not config.gradient_checkpointing or device.type != "cuda" or checkpoints_offloaded:
        return RecomputePlan(layers, 0, budget, 0.0, 0.0)
    from ..model import compute_dtype

    vector = model.config.hidden_size * compute_dtype(config.precision).itemsize
    tokens = config.micro_batch_size * config.block_size
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = min(budget, torch.cuda.get_device_properties(device).total_memory / GIB - 1.0)
    static = torch.cuda.memory_allocated(device) + trainable * (4 + 2)  # + fp32 gradients + 8-bit Adam's 2 moments
    step = tokens * vector * (STEP_OTHER_VECTORS + layers)  # + every layer's input (the checkpoints)
    room = budget * GIB - static - step - MARGIN_GIB * GIB
    compiling = config.compiles("compile_training") if compiled is None else compiled
    has_budget = hasattr(functorch_config, "activation_memory_budget")  # torch >= 2.4
    ways = [UNCHECKPOINTED] + (BUDGETED if compiling and has_budget else [])
    fitting = [
        (
            way,
            max(
                0,
                min(
                    layers,
                    int((room - tokens * vector * way.backward_peak_vectors) // (tokens * vector * way.kept_vectors)),
                ),
            ),
        )
        for way in ways
    ]
    way, unchecked = max(fitting, key=lambda fit: fit[1] * fit[0].recompute_removed)  # the most recompute gone
    per_layer = tokens * vector * way.kept_vectors
    peak = tokens * vector * (way.backward_peak_vectors if unchecked else CHECKPOINTED_BACKWARD_PEAK)
    estimate = (static + step + peak + unchecked * per_layer) / GIB + MARGIN_GIB
    if estimate > budget:
        warnings.warn(
            f"A micro-batch of {config.micro_batch_size} x {config.block_size} tokens needs about "
            f"{estimate:.1f} GiB with every layer checkpointed, over memory_budget_gib={budget:g}: lower "
            f"micro_batch_size (raise gradient_accumulation_steps to keep the step) or use the "
            f"colab-t4-low-memory preset",
            stacklevel=2,
        )
    return RecomputePlan(layers, unchecked, round(budget, 2), round(estimate, 2), round(per_layer / GIB, 3), way)


def leave_layers_unchecked(model, count: int) -> None:
    """Turn gradient checkpointing off for the last `count` decoder layers (their backward runs first, so what
    they keep is freed first)."""
    layers = _decoder_layers(model)
    for index, layer in enumerate(layers):
        if index >= len(layers) - count:
            layer.gradient_checkpointing = False
