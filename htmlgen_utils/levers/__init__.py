"""Speed and memory levers, kept apart from the plain 4-bit + LoRA path they accelerate.

Each lever computes what the plain path computes (a test compares loss, gradients or pages) and has a `Config`
switch. Training turns them on with one call, `apply_training_levers`; generation asks for compiled decoding per
call (`generate_pages(..., compile_decode=True)`). bench/RESULTS.md has what each measured.

    attention     per-example attention for long packed blocks, no block x block mask   (`packed_attention`)
                  block-sparse FlexAttention for packed blocks                          (`flex_attention`)
    offload       layer checkpoints parked in CPU memory during the forward             (`offload_activations`)
    recompute     un-checkpointed layers and the compiler's activation budget where     (`memory_budget_gib`)
                  memory allows
    compile       regional torch.compile of the decoder layers                          (`compile_training`)
    decoding      static KV cache, compiled decode step, our own batch-1 loop           (`compile_generation`)
    fallback      one line, then the plain path, when a compiled or captured path fails
"""

from __future__ import annotations

import torch

from ..config import Config
from .attention import (
    FLEX_ATTENTION,
    PACKED_ATTENTION,
    example_spans,
    packed_attention,
    use_flex_attention,
    use_packed_attention,
    wants_flex_attention,
)
from .compile import COMPILE_NOTE, compile_decoder_layers, uncompile_decoder_layers
from .decoding import compiled_decoding, decode_one, static_cache, wants_compiled_decode
from .fallback import fall_back, has_failed
from .offload import CheckpointsOnCPU, offload_checkpoints
from .recompute import RecomputePlan, leave_layers_unchecked, plan_recompute

__all__ = [
    "COMPILE_MIN_STEPS",
    "COMPILE_NOTE",
    "FLEX_ATTENTION",
    "PACKED_ATTENTION",
    "CheckpointsOnCPU",
    "RecomputePlan",
    "apply_training_levers",
    "fall_back",
    "has_failed",
    "stop_compiling",
    "compile_decoder_layers",
    "compiled_decoding",
    "decode_one",
    "example_spans",
    "leave_layers_unchecked",
    "memory_plan",
    "offload_checkpoints",
    "packed_attention",
    "plan_recompute",
    "static_cache",
    "use_flex_attention",
    "use_packed_attention",
    "wants_compiled_decode",
    "wants_flex_attention",
]

# Compiling the layers costs up to a minute once a process: a run of fewer optimiser steps than this would not win
# that time back from its faster steps, and runs eagerly.
COMPILE_MIN_STEPS = 10


def apply_training_levers(model, config: Config, device: torch.device, total_steps: int | None = None) -> list[str]:
    """Switch on the config's training levers for `model` (once; a second call changes nothing) and return
    their names, for the notebook to print. `total_steps` (the run's planned optimiser steps) decides whether
    compiling pays: a run shorter than `COMPILE_MIN_STEPS` is not compiled."""
    applied = model.__dict__.setdefault("_htmlgen_levers", [])
    wanted = []
    if wants_flex_attention(config, device):
        wanted.append("flex_attention")
    elif config.long_block_lever("packed_attention"):
        wanted.append("packed_attention")
    if config.long_block_lever("offload_activations") and device.type == "cuda":
        wanted.append("offload_activations")  # CPU memory is what it would save
    wants_compile = config.compiles("compile_training") and not has_failed(model, "compile_training")
    if config.compile_training == "auto" and not wants_compile and device.type == "cuda":
        print(
            "compile_training: off on this GPU (auto compiles only from compute capability 8.0, where it was "
            "measured); -p compile_training on opts in"
        )
    compiling = wants_compile and (
        "compile_training" in applied or total_steps is None or total_steps >= COMPILE_MIN_STEPS
    )
    if wants_compile and not compiling:
        print(
            f"compile_training: not compiling for {total_steps} step(s) (compiling pays from "
            f"{COMPILE_MIN_STEPS}); the layers run eagerly"
        )
    plan = plan_recompute(
        model, config, device, checkpoints_offloaded="offload_activations" in wanted + applied, compiled=compiling
    )
    if plan.unchecked:
        wanted.append("unchecked_layers")
    if compiling:
        wanted.append("compile_training")
    for name in wanted:
        if name in applied:
            continue
        if name == "packed_attention":
            use_packed_attention(model)
        elif name == "flex_attention":
            use_flex_attention(model)
        elif name == "offload_activations":
            offload_checkpoints(model)
        elif name == "unchecked_layers":
            leave_layers_unchecked(model, plan.unchecked)
            model.__dict__["_htmlgen_memory_plan"] = plan
            print(f"memory plan: {plan}")
        else:
            print(f"compile_training: the first step compiles the decoder layers ({COMPILE_NOTE})", flush=True)
            compile_decoder_layers(model, activation_budget=plan.activation_budget)
        applied.append(name)
    return list(applied)


def stop_compiling(model, error: BaseException) -> None:
    """After the compiled layers failed (in the first step): say so in one line and run the layers eagerly."""
    fall_back(model, "compile_training", error, "the decoder layers run eagerly (slower steps, the same numbers)")
    uncompile_decoder_layers(model)
    applied = model.__dict__.get("_htmlgen_levers", [])
    if "compile_training" in applied:
        applied.remove("compile_training")


def memory_plan(model) -> RecomputePlan | None:
    """The memory plan `apply_training_levers` left `model`'s layers un-checkpointed by (None where it left every
    layer checkpointed): what the training-time estimate needs to know of the recompute it removed."""
    return model.__dict__.get("_htmlgen_memory_plan")
