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
        with packed_attention(model), torch.autocast("cuda", dtype=torch.float16), (hooks or torch.enable_grad()):
            loss = next_token_loss(model, batch, config.loss_chunk_tokens)
        loss.backward()
        results.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert hooks.offloaded >= model.config.num_hidden_layers
    torch.testing.assert_close(results[0], results[1])
