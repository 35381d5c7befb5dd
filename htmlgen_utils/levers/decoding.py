"""Compiled decoding: a static KV cache, a compiled one-token step (CUDA graphs), and our own batch-1 loop.

A speed lever for generation on a GPU, with the workarounds of library internals it needs kept here, in one
place: the plain path (`generation.generate_pages` without `compile_decode`) never touches them.
One prompt at a time (the playground and the query API) skips `generate`: its per-token Python and its
every-token stop check (a host sync) cost more than the compiled step itself, so `decode_one` is a plain loop
that looks at its tokens only every `STOP_CHECK_TOKENS`.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from ..packing import STOP_STRING


@contextmanager
def compiled_decoding(model):
    """Let `generate` (and `decode_one`) run a compiled decode step for our 4-bit model.

    With a static KV cache, transformers compiles the one-token forward (`mode="reduce-overhead"`: CUDA graphs)
    on CUDA, which removes the per-token Python and kernel-launch overhead that bounds 4-bit + LoRA decoding
    (hundreds of small kernels a token). It refuses for every bitsandbytes model, a rule older than
    bitsandbytes' own support (4-bit layers compile since 0.46 with torch >= 2.8 and run in CUDA graphs since
    0.44), so the model's quantizer is hidden from that one check for the duration of the call. The first
    call of each batch size compiles (tens of seconds); later calls reuse it.

    A model prepared for training in this process carries transformers' hook that marks the embeddings'
    output as requiring grad (for gradient checkpointing); the compiler cannot trace it and would split the
    step in two graphs around it, so it is taken off for the call (no gradients are computed here) and put back.
    Taking it off and putting it back walks all the model's modules (~3 ms with a 7B model's LoRA layers), so
    `decode_one` does it once per piece of `STOP_CHECK_TOKENS` tokens, not per token.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    hooked = hasattr(base, "_require_grads_hook")
    base.hf_quantizer = None
    if hooked:
        base.disable_input_require_grads()
    try:
        yield
    finally:
        base.hf_quantizer = quantizer
        if hooked:
            base.enable_input_require_grads()


def wants_compiled_decode(model, config) -> bool:
    """The config's `compile_generation`, on CUDA only (on CPU there is nothing to gain from compiling)."""
    return bool(config.compile_generation) and next(model.parameters()).device.type == "cuda"


CACHE_LENGTH_STEP = 256  # static caches are sized in steps of this, so prompts of similar length share one


def static_cache(model, batch_size: int, tokens: int):
    """A static KV cache for `batch_size` rows of at least `tokens`, kept on the model and reused.

    The compiled decode step is specialised to its cache's tensors, so a new cache means a new compilation
    (about a minute for a 7B model on a GPU): the shortest cache already built for this batch size that is long
    enough is reused, and only a longer request builds one (`tokens` rounded up to `CACHE_LENGTH_STEP`)."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_htmlgen_static_caches", {})
    long_enough = [key for key in caches if key[0] == batch_size and key[1] >= tokens]
    key = min(long_enough, key=lambda k: k[1]) if long_enough else (
        batch_size, -(-tokens // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP)
    if key not in caches:
        caches[key] = StaticCache(config=model.config, max_cache_len=key[1])
    caches[key].reset()
    return caches[key]


def generate_with_static_cache(model, cache, **kwargs):
    """`generate` with our static cache (passed as `past_key_values`, the name every transformers 4.56-5.x takes)."""
    with compiled_decoding(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        return model.generate(**kwargs, past_key_values=cache)


STOP_CHECK_TOKENS = 16  # the loop reads its new tokens back (one host sync) this often, to see if the page ended


def _token_picker(do_sample: bool, temperature: float, top_p: float):
    """Greedy argmax, or sampling with transformers' temperature and top-p warpers (as `generate` samples)."""
    if not do_sample:
        return lambda logits: logits.argmax(-1, keepdim=True)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.float()
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(scores.softmax(-1), 1)

    return pick


def _stop_index(tokenizer, tokens: list[int], checked: int, stop_at_html_end: bool) -> int | None:
    """How many of `tokens` make the page (through EOS, or through the token that completes `</html>`), or
    None if it goes on. Only the tokens after the first `checked` are new."""
    eos_end = tokens.index(tokenizer.eos_token_id, checked) + 1 if tokenizer.eos_token_id in tokens[checked:] else None
    page = tokens[:eos_end]
    if stop_at_html_end and STOP_STRING in tokenizer.decode(page, skip_special_tokens=True):
        return next(end for end in range(checked + 1, len(page) + 1)
                    if STOP_STRING in tokenizer.decode(page[:end], skip_special_tokens=True))
    return eos_end


@torch.no_grad()
def decode_one(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
               temperature: float = 0.7, top_p: float = 0.95, stop_at_html_end: bool = True) -> Iterator[list[int]]:
    """One prompt's new tokens (its EOS included), yielded in pieces as they are read back.

    Prefill the static cache with the prompt, then one compiled forward a token (on CUDA: CUDA graphs; on
    CPU the same loop runs eagerly). The tokens stay on the GPU and are read back every `STOP_CHECK_TOKENS`,
    so the host launches steps ahead of the GPU instead of waiting for each; a page that ends mid-piece is cut
    where it ended (up to `STOP_CHECK_TOKENS` tokens were computed for nothing)."""
    from transformers import CompileConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    length = input_ids.shape[1]
    cache = static_cache(model, 1, length + max_new_tokens)
    step = base.get_compiled_call(CompileConfig()) if input_ids.is_cuda else base.__call__
    pick = _token_picker(do_sample, temperature, top_p)
    # the KV cache argument is `cache` from transformers 5.2x on, `past_key_values` before
    cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    positions = torch.arange(length + max_new_tokens, device=input_ids.device)
    new = torch.empty((1, max_new_tokens), dtype=torch.long, device=input_ids.device)
    logits = base(input_ids=input_ids, **{cache_name: cache}, cache_position=positions[:length], use_cache=True,
                  logits_to_keep=1).logits[:, -1]
    tokens: list[int] = []
    for start in range(0, max_new_tokens, STOP_CHECK_TOKENS):
        stop = min(start + STOP_CHECK_TOKENS, max_new_tokens)
        with compiled_decoding(model):  # one graph, also for a model prepared for training
            for i in range(start, stop):
                token = pick(logits)
                new[:, i] = token[:, 0]
                if i + 1 < max_new_tokens:  # launched before the read-back below, so the GPU keeps working
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
                    position = positions[length + i:length + i + 1]
                    logits = step(input_ids=token, **{cache_name: cache}, cache_position=position,
                                  position_ids=position[None], use_cache=True).logits[:, -1]
        checked = len(tokens)
        tokens += new[0, checked:stop].tolist()
        end = _stop_index(tokenizer, tokens, checked, stop_at_html_end)
        yield tokens[checked:end]
        if end is not None:
            return
