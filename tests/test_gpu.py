"""CUDA-only paths, checked where a GPU is (the benchmark machine runs this file); skipped on CPU."""

import pytest
import torch

from htmlgen_utils.config import Config
from htmlgen_utils.levers import CheckpointsOnCPU, packed_attention
from htmlgen_utils.loss import next_token_loss
from htmlgen_utils.model import load_for_training

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LENGTHS = [100, 150, 50, 212]  # four packed examples, one block of 512


def test_checkpoints_offloaded_on_a_side_stream_give_the_same_gradients():
    """The copies out run beside the compute stream; what comes back in backward must be what went out."""
    config = Config.from_preset("tiny", precision="fp16", lora_dropout=0.0, run_dir="/tmp/unused")
    model, _ = load_for_training(config)
    model.train()
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    input_ids = torch.randint(3, 500, (1, sum(LENGTHS)))
    batch = {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": positions}
    batch = {k: v.cuda() for k, v in batch.items()}
    results = []
    for hooks in (None, CheckpointsOnCPU(model.config.hidden_size)):
        model.zero_grad(set_to_none=True)
        with packed_attention(model), torch.autocast("cuda", dtype=torch.float16), hooks or torch.enable_grad():
            loss = next_token_loss(model, batch, config.loss_chunk_tokens)
        loss.backward()
        results.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert hooks.offloaded >= model.config.num_hidden_layers
    torch.testing.assert_close(results[0], results[1])


def _adapted_tiny_model():
    """The tiny base in fp16 with a LoRA that changes its pages (random B matrices), for generation."""
    model, tokenizer = load_for_training(Config.from_preset("tiny", precision="fp16", run_dir="/tmp/unused"))
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.02)
    return model.eval(), tokenizer


def _decode_and_check_against_eager(model, tokenizer, description: str) -> None:
    """120 greedy tokens from `decode_one`; at every position the token it picked is the eager model's argmax,
    or within fp16 rounding of it (a wrong position or cache slot would pick tokens the eager model rates far
    lower)."""
    from htmlgen_utils.levers.decoding import decode_one
    from htmlgen_utils.packing import build_prompt

    ids = tokenizer(build_prompt(description), return_tensors="pt").input_ids.cuda()
    tokens = torch.tensor(
        [[t for piece in decode_one(model, tokenizer, ids, 120, stop_at_html_end=False) for t in piece]]
    ).cuda()
    with torch.no_grad():
        eager = model(input_ids=torch.cat([ids, tokens], 1)).logits[0, ids.shape[1] - 1 : -1].float()
    shortfall = eager.max(-1).values - eager.gather(-1, tokens[0, :, None])[:, 0]
    assert tokens.shape[1] == 120 and shortfall.max() < 0.1, shortfall.max()
    assert (shortfall == 0).float().mean() > 0.9


def test_batch1_decoding_replays_its_cuda_graph_and_follows_the_eager_model():
    """`decode_one` on CUDA: the step is captured once as a CUDA graph (one-query attention, one-token LoRA
    matrices) and replayed per token. Its greedy tokens are the eager model's choices: at every position the token
    it picked is the eager model's argmax, or within fp16 rounding of it (a wrong position or cache slot would pick
    tokens the eager model rates far lower); a second page replays the same graph."""
    model, tokenizer = _adapted_tiny_model()
    for description in ("A modern landing page for Acme in blue", "Build a retro 404 error page for Nova."):
        _decode_and_check_against_eager(model, tokenizer, description)
    steps = list(model.__dict__["_htmlgen_decode_steps"].values())
    assert len(steps) == 1 and steps[0].graph is not None


def test_flex_attention_trains_what_the_block_mask_trains():
    """Block-sparse FlexAttention on CUDA (compiled), eager layers and compiled ones (also under the compiler's
    activation budget): the loss and LoRA gradients of SDPA with the block mask, within fp16 rounding (the CPU test
    can check only the forward)."""
    from htmlgen_utils.levers import FLEX_ATTENTION, compile_decoder_layers, use_flex_attention

    config = Config.from_preset("tiny", precision="fp16", lora_dropout=0.0, run_dir="/tmp/unused")
    model, _ = load_for_training(config)
    model.train()
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    torch.manual_seed(0)
    input_ids = torch.randint(3, 500, (1, sum(LENGTHS)))
    batch = {
        k: v.cuda() for k, v in {"input_ids": input_ids, "labels": input_ids.clone(), "position_ids": positions}.items()
    }

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = next_token_loss(model, batch, config.loss_chunk_tokens)
        loss.backward()
        return loss.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    masked = loss_and_grads()
    use_flex_attention(model)
    assert model.config._attn_implementation == FLEX_ATTENTION
    flex_eager = loss_and_grads()
    compile_decoder_layers(model)
    flex_compiled = loss_and_grads()
    torch._dynamo.reset()  # the same shapes again, compiled under the activation budget the memory plan may pick
    compile_decoder_layers(model, activation_budget=0.2)
    flex_budgeted = loss_and_grads()
    torch._dynamo.reset()
    for loss, grads in (flex_eager, flex_compiled, flex_budgeted):
        assert abs(loss - masked[0]) < 2e-3, (loss, masked[0])
        assert (grads - masked[1]).abs().max() <= 2e-2 * masked[1].abs().max()
