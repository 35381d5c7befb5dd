"""The next-token loss the loop trains on, and the teacher-forced evaluation that reports it.

Position t predicts token t + 1: the one shift happens here, once (`targets = labels[:, 1:]`). The original
notebook compared each position's logits with the *same* position's token and taught the model to copy;
`tests/test_levers.py` checks that our loss equals the model's own shifted causal-LM loss.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from .config import Config
from .model import autocast_context
from .packing import IGNORE_INDEX, make_dataloader


def count_targets(batches: list[dict]) -> int:
    """How many positions carry a loss in these micro-batches (labels shifted by one, -100 ignored).

    Read from the CPU tensors before they move to the GPU, so it costs no sync. Dividing each micro-batch's
    *summed* loss by this total makes an accumulated step the mean over all its tokens, exactly the loss of one
    big batch (a mean of per-micro-batch means would weight a token of a short micro-batch more). At least 1, so
    a group without targets divides by 1 (its loss is 0)."""
    return max(1, int(sum((batch["labels"][:, 1:] != IGNORE_INDEX).sum() for batch in batches)))


def _decoder_outputs(model, batch: dict) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(output head, final hidden states of positions 0..n-2, the tokens they predict at 1..n-1), flattened.

    Runs the decoder without its head; `use_cache=False` matters: with a KV cache transformers ignores the
    restarting position ids and lets packed examples attend to each other."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = batch["labels"][:, 1:].reshape(-1)  # the one shift: position t predicts token t + 1
    return causal_lm.get_output_embeddings(), hidden, targets


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def next_token_loss(model, batch: dict, chunk_tokens: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every labelled position against the next token: the model's own causal-LM loss
    (`reduction="mean"`), or its sum over the batch's target tokens (`"sum"`, what accumulation needs).

    `chunk_tokens=0` runs the head on the whole block (its fp32 [tokens, vocabulary] logits and their gradient
    exist at once: 4 x 32000 bytes a token for Llama-2). Otherwise the head and the loss run `chunk_tokens`
    positions at a time under checkpointing, so only one chunk's logits ever exist; the backward pass
    recomputes each chunk's logits (one extra head matmul, ~2% of a 7B step's FLOPs).

    Training on several processes passes `NextTokenLoss` wrapped in DistributedDataParallel instead of the
    model (`distributed.data_parallel`): the same loss, run through DDP's forward so that it averages the
    gradients over the processes."""
    if isinstance(model, DistributedDataParallel):
        return model(batch, chunk_tokens, reduction)
    head, hidden, targets = _decoder_outputs(model, batch)
    chunk = chunk_tokens if chunk_tokens > 0 else targets.numel()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        piece = slice(start, start + chunk)
        if chunk_tokens > 0:
            total = total + checkpoint(_chunk_loss_sum, head, hidden[piece], targets[piece], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, hidden[piece], targets[piece])
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class NextTokenLoss(torch.nn.Module):
    """`next_token_loss` of a model as a module's forward: what DistributedDataParallel wraps (it all-reduces the
    gradients of parameters its own forward used)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, chunk_tokens: int, reduction: str = "mean") -> torch.Tensor:
        return next_token_loss(self.model, batch, chunk_tokens, reduction)


@torch.no_grad()
def evaluate_blocks(model, blocks, config: Config, device: torch.device, max_batches: int | None = None) -> dict:
    """Token-weighted mean loss and next-token accuracy over packed blocks (teacher forcing).

    Runs eagerly even when training compiled the layers: a few validation batches would not repay a second
    compilation (for no-grad, eval-mode calls)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = torch.zeros((), device=device, dtype=torch.long)
    with torch.compiler.set_stance("force_eager"):
        for index, batch in enumerate(make_dataloader(blocks, config.micro_batch_size)):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast_context(config.precision, device):
                head, hidden, targets = _decoder_outputs(model, batch)
                chunk = config.loss_chunk_tokens or targets.numel()
                for start in range(0, targets.numel(), chunk):  # one chunk's fp32 logits at a time
                    piece_targets = targets[start : start + chunk]
                    logits = head(hidden[start : start + chunk]).float()
                    mask = piece_targets != IGNORE_INDEX
                    loss_sum += torch.nn.functional.cross_entropy(
                        logits, piece_targets, ignore_index=IGNORE_INDEX, reduction="sum"
                    ).double()
                    correct += (logits.argmax(-1)[mask] == piece_targets[mask]).sum()
                    count += mask.sum()
    if was_training:
        model.train()
    n = max(1, int(count))
    return {"eval_loss": float(loss_sum) / n, "eval_token_accuracy": float(correct) / n, "eval_tokens": int(count)}
