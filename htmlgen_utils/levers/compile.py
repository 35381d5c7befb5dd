"""Regional `torch.compile` of the decoder layers for training (a speed lever)."""

from __future__ import annotations

import torch
import torch._functorch.config as functorch_config

# What a learner is told before a compile starts (timed on two CPU cores with empty compiler caches, as a new Colab
# runtime has them: bench/RESULTS.md)
COMPILE_NOTE = "about a minute on two CPU cores, longer on a slower host"


def compile_decoder_layers(model, activation_budget: float | None = None) -> None:
    """`torch.compile` each decoder layer on its own ("regional" compilation).

    The layers are alike, so they share one compiled graph: it compiles once (seconds to a minute), not 32 times,
    and the embeddings, head, loss and checkpointing around them stay plain PyTorch. Inside a layer the
    compiler fuses the RMSNorms, rotary embedding, SwiGLU and LoRA's scale-and-add into a few kernels and
    launches them without Python in between; the 4-bit matmuls stay bitsandbytes' own kernels. Parameter
    names do not change (the module's call is wrapped, as `Module.compile` does), so adapters save as before.
    `dynamic=False`: a run's packed blocks all have one shape, and a graph specialised to it is the fastest.

    `activation_budget` (0-1, see `recompute.py`): the share of what the layer's backward needs that the compiled
    forward keeps; the compiler recomputes the rest in the backward, cheapest first. It is read when the graph
    compiles (at the first call), so each call runs under it. A process keeps the graph it compiled for a shape:
    layers compiled again for the same shape with another budget reuse it until `torch._dynamo.reset()`."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in causal_lm.model.layers:
        compiled = torch.compile(layer._call_impl, dynamic=False)
        if activation_budget is not None:
            compiled = _under_budget(compiled, activation_budget)
        layer._compiled_call_impl = compiled


def uncompile_decoder_layers(model) -> None:
    """Undo `compile_decoder_layers`: each layer runs its plain forward again (after a failed compile)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in causal_lm.model.layers:
        layer._compiled_call_impl = None


def _under_budget(compiled, activation_budget: float):
    """`compiled`, called with the compiler's activation memory budget set (for the call that compiles)."""

    def call(*args, **kwargs):
        with functorch_config.patch(activation_memory_budget=activation_budget):
            return compiled(*args, **kwargs)

    return call
