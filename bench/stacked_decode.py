"""A decode-step candidate, to be measured (`decode_tuning.py --builds before,stacked`) before it may join the
package: the projections of a layer that read the same input (q, k and v; gate and up) run, for one token, as
one 4-bit product and one LoRA-A product each instead of three and two.

Why: bitsandbytes' matrix-vector kernel reads a larger matrix faster (`four_bit_matvec_words.py`: q, k and v
stacked into one 12288 x 4096 product took 24.75 us against 3 x 10.25, gate and up 41.42 against 2 x 22.21,
~0.29 ms of a 5.9 ms token), and every kernel of a one-token step costs ~2-3 us of latency and a gap
(`decode_anatomy.py`), so two fewer 4-bit products and LoRA-A products a group is fewer kernels as well.

How: a `SharedInput` group holds a copy of its members' packed 4-bit weights one after the other (each
matrix's rows are contiguous bytes, so stacking is concatenation) with their absmax unnested (each weight's
nested absmax is quantised per matrix, so the stacked one keeps the float32 values bitsandbytes itself
dequantises: the same weights exactly), and its members' LoRA A matrices stacked. While `stacked_projections`
is active, each member's base layer and LoRA A are stand-ins: for one token the first member (q, gate) computes
the group's products and every member returns its slice; anything longer (the prompt) runs the originals. The
members are called in order with the same input (Llama's attention and MLP do); an eager check says so.
The copy costs memory (~2.2 GB for a 7B model besides the ~0.35 GB of unnested absmax): a lever would make the
members' weights views into it.

`stacked_layers` goes one step further (`decode_tuning.py --builds ...,stacked-lora`): the members' LoRA B
products and the adds onto the 4-bit outputs are one multiply-and-sum a group as well (the three B products of
q/k/v were 3.4 us each in `decode_anatomy.py`), the first member computing the group's whole output and every
member returning its slice. Its LoRA B matrices and scalings are a snapshot taken when the groups are built.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def unnested_absmax(state) -> torch.Tensor:
    """A 4-bit weight's absmax (one per 64 weights) as the float32 values bitsandbytes dequantises it with."""
    from bitsandbytes.functional import dequantize_blockwise

    if not state.nested:
        return state.absmax.float()
    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


class SharedInput:
    """Members (peft LoRA layers over bitsandbytes 4-bit layers) that read the same input, stacked."""

    def __init__(self, members: list) -> None:
        from bitsandbytes.functional import QuantState

        bases = [member.get_base_layer() for member in members]
        states = [base.weight.quant_state for base in bases]
        first = states[0]
        self.rows = [state.shape[0] for state in states]
        self.compute_dtype = bases[0].compute_dtype
        # CPU inference may have re-packed the weights for its own kernel: then the group runs the originals
        self.packed_for_cpu = any(getattr(state, "packing_format_for_cpu", False) for state in states)
        if not self.packed_for_cpu:
            self.weight = torch.cat([base.weight.data.reshape(-1) for base in bases]).view(-1, 1)
            self.state = QuantState(absmax=torch.cat([unnested_absmax(state) for state in states]),
                                    shape=torch.Size([sum(self.rows), first.shape[1]]), code=first.code,
                                    blocksize=first.blocksize, quant_type=first.quant_type, dtype=first.dtype)
        adapter = members[0].active_adapters[0]
        a_matrices = [member.lora_A[adapter].weight for member in members]
        self.ranks = [a.shape[0] for a in a_matrices]
        self.lora_a = torch.cat([a.detach() for a in a_matrices])
        # a snapshot of the adapter, for decoding: each output row's LoRA B row and its member's scaling
        self.lora_b = torch.cat([member.lora_B[adapter].weight.detach() for member in members])
        self.scales = torch.cat([torch.full((rows,), float(member.scaling[adapter]), device=self.lora_b.device)
                                 for member, rows in zip(members, self.rows)])
        self.adapter, self.members, self.originals = adapter, members, bases
        self.input = self.base_out = self.lora_out = self.out = None

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        """All members' 4-bit products of one token, one after the other along the last dimension."""
        import bitsandbytes as bnb

        if self.packed_for_cpu:
            return torch.cat([original(x) for original in self.originals], -1)
        return bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, quant_state=self.state).to(x.dtype)


    def check_follows_first(self, x: torch.Tensor) -> None:
        """Refuse a later member whose input is not the one the first member computed the group's products from
        (checked when eager; compiled, the step is traced in the order the eager checks saw)."""
        if not torch.compiler.is_compiling() and self.input is not x:
            raise RuntimeError("a stacked projection was called out of order or with another input")

    def lora_product(self, x: torch.Tensor) -> torch.Tensor:
        """All members' LoRA outputs (B A x, scaled) of one token, in float32: one multiply-and-sum for the A
        matrices, one for the B matrices (each output row meets its own member's part of `A x`)."""
        low_rank = (x.to(self.lora_a.dtype).unsqueeze(-2) * self.lora_a).sum(-1)  # (..., sum of ranks)
        spread = torch.cat([part.unsqueeze(-2).expand(*part.shape[:-1], rows, part.shape[-1])
                            for part, rows in zip(low_rank.split(self.ranks, -1), self.rows)], -2)
        return (spread * self.lora_b).sum(-1) * self.scales  # (..., sum of rows)


def _slice(values: torch.Tensor, sizes: list[int], index: int) -> torch.Tensor:
    start = sum(sizes[:index])
    return values[..., start:start + sizes[index]]


class StackedBase(torch.nn.Module):
    """A member's base layer while stacked: its slice of the group's 4-bit product for one token."""

    def __init__(self, group: SharedInput, index: int) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.original = [group.originals[index]]  # a list: not registered, the module tree stays as it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return self.original[0](x)
        if self.index == 0:
            self.group.input, self.group.base_out = x, self.group.base_product(x)
        else:
            self.group.check_follows_first(x)
        return _slice(self.group.base_out, self.group.rows, self.index)


class StackedA(torch.nn.Module):
    """A member's LoRA A while stacked: its slice of the group's LoRA-A product for one token."""

    def __init__(self, group: SharedInput, index: int, original: torch.nn.Module) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.original = [original]

    @property
    def weight(self) -> torch.Tensor:  # peft casts the input to the LoRA weights' dtype
        return self.original[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return self.original[0](x)
        if self.index == 0:
            self.group.lora_out = (x.unsqueeze(-2) * self.group.lora_a).sum(-1)
        return _slice(self.group.lora_out, self.group.ranks, self.index)


class StackedLora:
    """Mixed into a member's own (peft) class while `stacked_layers` is active: for one token the first member
    computes the whole group's output (4-bit products, LoRA products, the add) and every member returns its
    slice, so the LoRA B products and adds of a group are one multiply-and-sum too."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        group, index = self._stacked_group
        if x.shape[:-1].numel() != 1 or self.training or self.disable_adapters or self.merged or args or kwargs:
            return super().forward(x, *args, **kwargs)
        if index == 0:
            base = group.base_product(x)
            group.input, group.out = x, base + group.lora_product(x).to(base.dtype)
        else:
            group.check_follows_first(x)
        return _slice(group.out, group.rows, index)


def shared_input_groups(model) -> list[SharedInput]:
    """One group for each layer's q/k/v and one for its gate/up (LoRA layers over 4-bit layers only)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    groups = []
    for layer in causal_lm.model.layers:
        for block, names in GROUPS:
            members = [getattr(getattr(layer, block), name) for name in names]
            if all(hasattr(member, "lora_A") and hasattr(member.get_base_layer().weight, "quant_state")
                   for member in members):
                groups.append(SharedInput(members))
    return groups


@contextmanager
def stacked_projections(groups: list[SharedInput]) -> Iterator[None]:
    """Swap the groups' stand-ins in for their members' base layers and LoRA A matrices, and back after."""
    swapped = []
    for group in groups:
        for index, member in enumerate(group.members):
            original_a = member.lora_A[group.adapter]
            member.base_layer = StackedBase(group, index)
            member.lora_A[group.adapter] = StackedA(group, index, original_a)
            swapped.append((member, group.originals[index], original_a, group.adapter))
    try:
        yield
    finally:
        for member, base, lora_a, adapter in swapped:
            member.base_layer = base
            member.lora_A[adapter] = lora_a


_STACKED_CLASSES: dict[type, type] = {}


@contextmanager
def stacked_layers(groups: list[SharedInput]) -> Iterator[None]:
    """Make the groups' members compute as one (`StackedLora`) for one-token inputs, and themselves again after."""
    swapped = []
    for group in groups:
        for index, member in enumerate(group.members):
            own = type(member)
            if own not in _STACKED_CLASSES:
                _STACKED_CLASSES[own] = type(f"Stacked{own.__name__}", (StackedLora, own), {})
            member.__class__ = _STACKED_CLASSES[own]
            member._stacked_group = (group, index)
            swapped.append((member, own))
    try:
        yield
    finally:
        for member, own in swapped:
            member.__class__ = own
            del member._stacked_group
