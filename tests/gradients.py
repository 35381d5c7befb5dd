"""Loss and gradients of one packed batch, and their comparison: how the lever tests show a lever changes nothing."""

from contextlib import nullcontext

import torch

from htmlgen_utils.levers import packed_attention
from htmlgen_utils.loss import next_token_loss


def loss_and_grads(model, batch, chunk_tokens=0, attention_per_example=False, hooks=None):
    model.zero_grad(set_to_none=True)
    with packed_attention(model, attention_per_example):
        with hooks if hooks is not None else nullcontext():
            loss = next_token_loss(model, batch, chunk_tokens)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(reference, other, atol=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert torch.allclose(loss_a, loss_b, atol=atol), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    scale = max(g.abs().max() for g in grads_a.values())
    assert scale > 0
    worst = max((grads_a[k] - grads_b[k]).abs().max() for k in grads_a)
    assert worst <= atol * max(1.0, float(scale)), worst
