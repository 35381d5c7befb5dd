"""A tiny Llama-architecture model and tokenizer built locally, for CPU runs and tests.

It has the same architecture and file layout as Llama-2-7B (`LlamaForCausalLM`, a fast tokenizer with
BOS/EOS/PAD), so `AutoModelForCausalLM` / `AutoTokenizer` and the 4-bit + LoRA code load it by path,
exactly as they load the real model from the hub. Only the sizes differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, spaces_apart: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown characters possible) that adds BOS like Llama's.

    `spaces_apart` learns no merge across a space, so a space is always a token of its own and a word is the same
    token after a space as after a tag (' Kite' in a description, '<title>Kite' on the page): a model as small as
    the tiny base learns to copy names only then. The saved tokenizer is plain byte-level BPE (GPT-2's split), which
    GGUF can describe: with no merge that starts from a space, it splits exactly as it was trained."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"), byte_level])
        if spaces_apart
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.pre_tokenizer = byte_level
    bos_id = tokenizer.token_to_id(SPECIAL_TOKENS["bos_token"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos_token']} $A",
        pair=f"{SPECIAL_TOKENS['bos_token']} $A $B",
        special_tokens=[(SPECIAL_TOKENS["bos_token"], bos_id)],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=4096, **SPECIAL_TOKENS)


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 2048,
) -> LlamaConfig:
    """Llama-2's architecture at toy size. Widths are multiples of 64, the 4-bit quantisation block."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llama(
    out_dir: str | Path, texts: Iterable[str], vocab_size: int = 1024, seed: int = 0, **config_kwargs
) -> Path:
    """Train a tokenizer on `texts`, make a randomly initialised tiny Llama, save both to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **config_kwargs))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
