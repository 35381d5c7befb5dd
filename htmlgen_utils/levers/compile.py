"""Regional `torch.compile` of the decoder layers for training (a speed lever)."""
from __future__ import annotations


def compile_decoder_layers(model) -> None:
    """`torch.compile` each decoder layer on its own ("regional" compilation).

    The layers are alike, so they share one compiled graph: it compiles once (seconds to a minute), not 32 times,
    and the embeddings, head, loss and checkpointing around them stay plain PyTorch. Inside a layer the
    compiler fuses the RMSNorms, rotary embedding, SwiGLU and LoRA's scale-and-add into a few kernels and
    launches them without Python in between; the 4-bit matmuls stay bitsandbytes' own kernels. Parameter
    names do not change (`Module.compile` wraps the call, not the module), so adapters save as before.
    `dynamic=False`: a run's packed blocks all have one shape, and a graph specialised to it is the fastest."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in causal_lm.model.layers:
        layer.compile(dynamic=False)
