"""Tiny random models of the newer bases the series supports, each with a tokenizer shaped like the real one's:
Llama-3.x (byte-level BPE with Llama-3's split regex, no pad and no unk token, Llama-3.1's RoPE scaling, grouped
KV heads), Qwen2.5 (Qwen2's regex, no BOS, pad = EOS = <|endoftext|>, biased q/k/v, tied embeddings, an embedding
rounded up past the vocabulary) and Mistral (a sentencepiece-style BPE with byte fallback, <unk> but no pad)."""

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

SPECIALS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    "qwen2": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}


def _byte_level(texts, regex: str, specials: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(specials)  # after the vocabulary, as the real ones are
    return tokenizer


def _sentencepiece_style(texts, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_tiny(kind: str, out_dir: Path, texts: list[str], seed: int = 0) -> Path:
    """A random tiny model of `kind` and its tokenizer, saved as a hub model would be."""
    if kind == "mistral":
        backend = _sentencepiece_style(texts, 1024)
    else:
        regex = GGUF_PRE_TOKENIZER_SPLITS["llama-bpe" if kind == "llama3" else "qwen2"]
        specials = list(dict.fromkeys(SPECIALS[kind].values()))
        if kind == "llama3":
            specials.append("<|finetune_right_pad_id|>")  # Llama-3.1's spare token, which the series pads with
        backend = _byte_level(texts, regex, specials, 1024)
    bos = SPECIALS[kind].get("bos_token")
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS[kind])
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if kind == "llama3":
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        config = LlamaConfig(**shape, rope_parameters={**rope, "original_max_position_embeddings": 512})
    elif kind == "qwen2":
        config = Qwen2Config(**{**shape, "vocab_size": len(tokenizer) + 64}, tie_word_embeddings=True)
    else:
        config = MistralConfig(**shape, sliding_window=4096)
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
