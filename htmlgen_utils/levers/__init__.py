"""Speed and memory levers, kept apart from the plain 4-bit + LoRA path they accelerate.

Each lever gives the plain path's numbers (a CPU test checks loss, gradients or pages) and has a `Config`
switch; `bench/README.md` measures each. Training turns them on with one call, `apply_training_levers`;
generation asks for compiled decoding per call (`generate_pages(..., compile_decode=True)`).

    attention  per-example attention for packed blocks, no block x block mask   (`packed_attention`)
    offload    layer checkpoints parked in CPU memory during the forward       (`offload_activations`)
    compile    regional torch.compile of the decoder layers                    (`compile_training`)
    decoding   static KV cache, compiled decode step, our own batch-1 loop     (`compile_generation`)

The chunked loss (`loss_chunk_tokens`) and the half-precision frozen embeddings (`embeddings_in_compute_dtype`)
live where they act, in `loss.next_token_loss` and `model.prepare_4bit_for_training`.
"""
from __future__ import annotations

import torch

from ..config import Config
from .attention import PACKED_ATTENTION, example_spans, packed_attention, use_packed_attention
from .compile import compile_decoder_layers
from .decoding import compiled_decoding, decode_one, static_cache, wants_compiled_decode
from .offload import CheckpointsOnCPU, offload_checkpoints

__all__ = ["PACKED_ATTENTION", "CheckpointsOnCPU", "apply_training_levers", "compile_decoder_layers",
           "compiled_decoding", "decode_one", "example_spans", "offload_checkpoints", "packed_attention",
           "static_cache", "use_packed_attention", "wants_compiled_decode"]


def apply_training_levers(model, config: Config, device: torch.device) -> list[str]:
    """Switch on the config's training levers for `model` (once; a second call changes nothing) and return
    their names, for the notebook to print."""
    applied = model.__dict__.setdefault("_htmlgen_levers", [])
    wanted = []
    if config.long_block_lever("packed_attention"):
        wanted.append("packed_attention")
    if config.long_block_lever("offload_activations") and device.type == "cuda":
        wanted.append("offload_activations")  # CPU memory is what it would save
    if config.compile_training:
        wanted.append("compile_training")
    for name in wanted:
        if name in applied:
            continue
        if name == "packed_attention":
            use_packed_attention(model)
        elif name == "offload_activations":
            offload_checkpoints(model)
        else:
            compile_decoder_layers(model)
        applied.append(name)
    return list(applied)
