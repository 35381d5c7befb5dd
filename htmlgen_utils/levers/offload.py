"""Layer checkpoints parked in CPU memory during the forward pass (a memory lever, for small GPUs and long blocks)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _copy_stream() -> torch.cuda.Stream:
    return torch.cuda.Stream()


class CheckpointsOnCPU(torch.autograd.graph.saved_tensors_hooks):
    """Inside this context, residual-stream tensors saved for backward (the layer checkpoints: one
    [batch, block, hidden] tensor per layer) wait in pinned CPU memory instead of on the GPU.

    With gradient checkpointing those checkpoints are most of what grows with the block: layers x tokens x hidden
    size values (2 bytes each in fp16). Only tensors on `device_type` whose last dimension is the hidden
    size move; masks, rotary tables and ids stay (they are shared by every layer). On CUDA the copies out run
    on a side stream, beside the layers' kernels instead of between them; they come back in backward, layer
    by layer, on the compute stream (which needs them at once).
    """

    def __init__(self, hidden_size: int, device_type: str = "cuda"):
        self.offloaded = 0
        side = _copy_stream() if device_type == "cuda" else None

        def pack(tensor: torch.Tensor):
            if (
                tensor.device.type != device_type
                or tensor.dim() < 2
                or tensor.shape[-1] != hidden_size
                or not tensor.is_floating_point()
                or isinstance(tensor, torch.nn.Parameter)
            ):
                return tensor
            parked = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=side is not None)
            if side is None:
                parked.copy_(tensor)
            else:
                side.wait_stream(torch.cuda.current_stream())  # the tensor is written
                with torch.cuda.stream(side):
                    parked.copy_(tensor, non_blocking=True)
                tensor.record_stream(side)  # its memory is not reused before the copy has read it
            self.offloaded += 1
            return tensor.device, parked

        def unpack(packed):
            if isinstance(packed, tuple):
                device, parked = packed
                if side is not None:
                    torch.cuda.current_stream().wait_stream(side)  # the copy out has finished
                return parked.to(device, non_blocking=True)
            return packed

        super().__init__(pack, unpack)


def offload_checkpoints(model, device_type: str = "cuda") -> CheckpointsOnCPU:
    """Put `CheckpointsOnCPU` around every training forward of the model's decoder stack, for good.

    Hooks on the decoder enter the context when a forward with gradients starts and leave it when the forward
    ends (also when it fails). The backward's checkpoint recompute runs each layer again, not the stack, so it
    needs no hook: the parked tensors come back through their own `unpack`. Returns the context, whose
    `offloaded` counts the tensors moved."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.model
    hooks = CheckpointsOnCPU(causal_lm.config.hidden_size, device_type)
    entered: list[bool] = []

    def enter(module, args, kwargs):
        active = module.training and torch.is_grad_enabled()
        if active:
            hooks.__enter__()
        entered.append(active)

    def leave(module, args, kwargs, output):
        if entered.pop():
            hooks.__exit__(None, None, None)

    decoder.register_forward_pre_hook(enter, with_kwargs=True)
    decoder.register_forward_hook(leave, with_kwargs=True, always_call=True)
    return hooks
