"""The loss: the model's own shifted next-token loss, whole or in chunks."""

import torch

from htmlgen_utils.loss import next_token_loss
from tests.gradients import assert_same, loss_and_grads


def test_model_loss_is_the_shifted_next_token_loss(training_model, packed_batch):
    model_loss = training_model(**packed_batch, use_cache=False).loss
    ours = next_token_loss(training_model, packed_batch, 300)
    assert torch.allclose(ours, model_loss, atol=1e-6)
    logits = training_model(**{k: v for k, v in packed_batch.items() if k != "labels"}, use_cache=False).logits
    unshifted = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), packed_batch["labels"].flatten())
    assert not torch.allclose(ours, unshifted, atol=1e-3)  # the original's defect would be caught


def test_chunked_loss_matches_whole_block_loss(training_model, packed_batch):
    whole = loss_and_grads(training_model, packed_batch, chunk_tokens=0)
    for chunk in (100, 512):
        assert_same(whole, loss_and_grads(training_model, packed_batch, chunk_tokens=chunk))
