"""Models the tests share."""

from pathlib import Path

from htmlgen_utils.model import load_trained


def adapted_tiny_model(run_dir: str | Path):
    """The tiny chain's fine-tuned model, loaded afresh (tests change it): the shipped base in 4-bit with the
    chain's LoRA adapter, in eval mode. It writes a page for a description; the base alone, which never saw the
    prompt's form, mostly answers with EOS, so the adapter on or off gives different pages."""
    model, tokenizer, _ = load_trained(run_dir)
    return model, tokenizer
