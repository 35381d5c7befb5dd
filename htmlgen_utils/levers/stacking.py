"""Stacked projections for batch-1 decoding: a layer's q, k and v (and its gate and up) as one layer.

Part of the one-token decode step (`decoding.DecodeStep`). q/k/v read the same input, as do gate/up, so for one
token each group runs one 4-bit product, one LoRA-A and one LoRA-B multiply-and-sum and one add, instead of one of
each per member: fewer, larger kernels, and every kernel of a one-token step costs latency. o and down are groups
of one, so that their products read the decode layout (`column_words.py`) too.

A group lays its members' packed 4-bit weights one after the other in one buffer (a matrix's rows are contiguous
bytes, so stacking is concatenation) and makes each member's weight a view into it: no weight is stored twice.
The absmax is kept unnested (float32, ~0.28 GB for a 7B model), the values bitsandbytes dequantises with. The
LoRA matrices are copied into stacked buffers, refreshed in place before each decode, so a captured graph reads
the adapter as it is now. While `stacked_layers` is active, the first member computes the group's output for a
one-token input and every member returns its slice; anything else runs the member's own forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .column_words import ColumnWords, column_words_bytes, zero_outputs

GROUPS = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)


def unnested_absmax(state) -> torch.Tensor:
    """A 4-bit weight's absmax (one per block of weights) as the float32 values bitsandbytes dequantises with."""
    from bitsandbytes.functional import dequantize_blockwise

    if not state.nested:
        return state.absmax.float()
    return (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


class SharedInput:
    """Members (peft LoRA layers over bitsandbytes 4-bit layers, one adapter) that read the same input."""

    def __init__(self, members: list) -> None:

        bases = [member.get_base_layer() for member in members]
        states = [base.weight.quant_state for base in bases]
        first = states[0]
        self.members, self.adapter = members, members[0].active_adapters[0]
        self.rows = [state.shape[0] for state in states]
        self.compute_dtype = bases[0].compute_dtype
        if len(members) == 1:  # a group of one reads its weight as loaded
            self.weight, self.state = bases[0].weight.data, first
        else:
            self._stack(bases, states)
        self.ranks = [member.lora_A[self.adapter].weight.shape[0] for member in members]
        like_a, like_b = members[0].lora_A[self.adapter].weight, members[0].lora_B[self.adapter].weight
        self.lora_a = like_a.new_empty((sum(self.ranks), like_a.shape[1]))
        self.lora_b = like_b.new_empty((sum(self.rows), like_b.shape[1]))
        self.scales = like_b.new_empty(sum(self.rows))
        self.input = self.out = None
        self.columns: ColumnWords | None = None  # the decode layout, built on request (`build_column_words`)
        self.use_columns = False  # set by `stacked_layers` for the step it runs
        self.refresh()

    def build_column_words(self) -> bool:
        """Lay the group's weight out once more for one-token products (`column_words.ColumnWords`), where the
        format allows and the GPU has room for it (`room_for_copy`); a second call changes nothing.
        Returns whether the group has the layout."""
        if self.columns is None and ColumnWords.fits(self.weight, self.state):
            room = True
            if self.weight.is_cuda:  # the driver's free memory and what torch's allocator holds unused
                device = self.weight.device
                free, total = torch.cuda.mem_get_info(device)
                # a cap set on this process (`torch.cuda.set_per_process_memory_fraction`) is its GPU's size
                fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)
                reserved, total = torch.cuda.memory_reserved(device), int(total * fraction)
                free = min(free, total - reserved) + reserved - torch.cuda.memory_allocated(device)
                room = room_for_copy(column_words_bytes(self.state), free, total)
            if room:
                self.columns = ColumnWords(self.weight, unnested_absmax(self.state), self.state)
        return self.columns is not None

    def _stack(self, bases: list, states: list) -> None:
        from bitsandbytes.functional import QuantState

        first = states[0]
        self.weight = torch.cat([base.weight.data.reshape(-1) for base in bases]).view(-1, 1)
        start = 0
        for base in bases:  # each member's weight becomes its part of the stacked one: no second copy
            size = base.weight.data.numel()
            base.weight.data = self.weight[start : start + size].view(base.weight.data.shape)
            start += size
        self.state = QuantState(
            absmax=torch.cat([unnested_absmax(state) for state in states]),
            shape=torch.Size([sum(self.rows), first.shape[1]]),
            code=first.code,
            blocksize=first.blocksize,
            quant_type=first.quant_type,
            dtype=first.dtype,
        )

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the members' LoRA matrices and scalings into the stacked buffers (in place: a captured graph
        keeps reading the same tensors), as they may have been trained since the group was built."""
        a = [member.lora_A[self.adapter].weight for member in self.members]
        b = [member.lora_B[self.adapter].weight for member in self.members]
        torch.cat(a, out=self.lora_a)
        torch.cat(b, out=self.lora_b)
        for part, member in zip(self.scales.split(self.rows), self.members):
            part.fill_(float(member.scaling[self.adapter]))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """All members' outputs for one token, one after the other along the last dimension: the 4-bit product
        plus the LoRA product (B A x, scaled), each output row meeting its own member's part of `A x`."""
        if self.use_columns and self.columns is not None:
            base = self.columns.product(x).to(x.dtype)
        else:
            import bitsandbytes as bnb

            x_in = x.to(self.compute_dtype or x.dtype)
            base = bnb.matmul_4bit(x_in, self.weight.view(-1, 1), quant_state=self.state).to(x.dtype)
        low_rank = (x.to(self.lora_a.dtype).unsqueeze(-2) * self.lora_a).sum(-1)  # (..., sum of ranks)
        spread = torch.cat(
            [
                part.unsqueeze(-2).expand(*part.shape[:-1], rows, part.shape[-1])
                for part, rows in zip(low_rank.split(self.ranks, -1), self.rows)
            ],
            -2,
        )
        return base + ((spread * self.lora_b).sum(-1) * self.scales).to(base.dtype)

    def check_follows_first(self, x: torch.Tensor) -> None:
        """Refuse a later member whose input is not the one the first member computed the group's output from
        (checked when eager; compiled, the step is traced in the order the eager checks saw)."""
        if not torch.compiler.is_compiling() and self.input is not x:
            raise RuntimeError("a stacked projection was called out of order or with another input")


class StackedLora:
    """Mixed into a member's own (peft) class while `stacked_layers` is active: for one token the first member
    computes the whole group's output and every member returns its slice."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        group, index = self._stacked_group
        if (
            x.shape[:-1].numel() != 1
            or self.training
            or self.disable_adapters
            or self.merged
            or args
            or kwargs
            or list(self.active_adapters) != [group.adapter]
        ):
            return super().forward(x, *args, **kwargs)
        if index == 0:
            group.input, group.out = x, group.output(x)
        else:
            group.check_follows_first(x)
        start = sum(group.rows[:index])
        return group.out[..., start : start + group.rows[index]]


def _stackable(member) -> bool:
    """A peft LoRA layer over a bitsandbytes 4-bit layer, with one plain (not DoRA) adapter, on the GPU layout
    (bitsandbytes may re-pack a weight for its CPU kernel; such a weight is left alone)."""
    if not hasattr(member, "lora_A") or len(member.active_adapters) != 1:
        return False
    state = getattr(member.get_base_layer().weight, "quant_state", None)
    adapter = member.active_adapters[0]
    return (
        state is not None
        and not getattr(state, "packing_format_for_cpu", False)
        and state.shape.numel() % state.blocksize == 0  # whole blocks: the absmax stack as the weights do
        and adapter in member.lora_A
        and adapter not in getattr(member, "lora_variant", {})
    )


def _one_layout(members: list) -> bool:
    """Members whose weights can be read as one matrix: one adapter, one 4-bit format, the same input size."""
    states = [member.get_base_layer().weight.quant_state for member in members]
    return (
        len({member.active_adapters[0] for member in members}) == 1
        and len({(s.quant_type, s.blocksize, s.dtype, s.shape[1]) for s in states}) == 1
        and all(torch.equal(s.code, states[0].code) for s in states)
    )


def shared_input_groups(model) -> list[SharedInput]:
    """Each layer's q/k/v, o, gate/up and down groups, built at the first call and kept on the model; their LoRA
    buffers are refreshed at every call. Layers whose members are not all stackable are left out."""
    groups = model.__dict__.get("_htmlgen_shared_inputs")
    if groups is None:
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        groups = []
        for layer in causal_lm.model.layers:
            for block, names in GROUPS:
                members = [getattr(getattr(layer, block), name) for name in names]
                if all(_stackable(member) for member in members) and _one_layout(members):
                    groups.append(SharedInput(members))
        model.__dict__["_htmlgen_shared_inputs"] = groups
    else:
        for group in groups:
            group.refresh()
    return groups


_STACKED_CLASSES: dict[type, type] = {}


KEEP_FREE_SHARE = 0.25  # of the GPU's memory, left free by the decode layout for KV caches, batches, training


def room_for_copy(needed: int, free: int, total: int) -> bool:
    """Whether a copy of `needed` bytes still leaves `KEEP_FREE_SHARE` of the GPU's `total` memory `free`: the
    decode layout is a speed-up, never worth an out-of-memory error later (a batch's KV cache, a training step)."""
    return free - needed >= KEEP_FREE_SHARE * total


@contextmanager
def stacked_layers(groups: list[SharedInput], column_words: bool = False) -> Iterator[None]:
    """Make the groups' members compute as one (`StackedLora`) for one-token inputs, and themselves again after;
    with `column_words`, a one-token product reads the group's decode layout where it has one (one step's
    worth: their outputs are zeroed here, each group computes once a step)."""
    if column_words:
        zero_outputs([group.columns for group in groups if group.columns is not None])
    swapped = []
    for group in groups:
        group.use_columns = column_words
        for index, member in enumerate(group.members):
            if isinstance(member, StackedLora):  # already stacked by an enclosing call
                continue
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
        for group in groups:
            group.use_columns = False
