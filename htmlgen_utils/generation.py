"""Stage 5a: write pages for descriptions with the trained model.

Batched (left padding, so every prompt ends where generation starts), KV cache on, and stopped per row
at EOS or at `</html>` (transformers' stop-string criterion), so a finished page costs no more tokens.
The output is the page only: the prompt is stripped and anything after `</html>` is cut.

One prompt at a time with the compiled step (the playground and the query API) skips `generate`: its
per-token Python and its every-token stop check (a host sync) cost more than the compiled step itself,
so `decode_one` is a plain loop that looks at its tokens only every `STOP_CHECK_TOKENS`.
"""
from __future__ import annotations

import inspect
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .packing import build_prompt

STOP_STRING = "</html>"


@dataclass
class GenerationResult:
    pages: list[str]
    new_tokens: list[int]  # tokens generated for each page (its EOS included)
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / max(self.seconds, 1e-9)

    @property
    def examples_per_s(self) -> float:
        return len(self.pages) / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        return {"examples": len(self.pages), "new_tokens": sum(self.new_tokens), "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "examples_per_s": round(self.examples_per_s, 4),
                **self.settings}


def clean_page(text: str) -> str:
    """The page text: everything up to and including the first `</html>`, surrounding whitespace removed."""
    end = text.find(STOP_STRING)
    if end >= 0:
        text = text[: end + len(STOP_STRING)]
    return text.strip()


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


def _generate_with_cache(model, cache, **kwargs):
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


def _generation_kwargs(tokenizer, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                       stop_at_html_end: bool) -> dict:
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # plain greedy; silence sampling defaults a checkpoint's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_at_html_end:
        kwargs.update(stop_strings=[STOP_STRING], tokenizer=tokenizer)
    return kwargs


@torch.no_grad()
def generate_pages(model, tokenizer, descriptions: list[str], max_new_tokens: int = 1024, batch_size: int = 8,
                   do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.95,
                   stop_at_html_end: bool = True, seed: int = 0, compile_decode: bool = False) -> GenerationResult:
    """Pages for `descriptions`, in their order. Prompts are batched by similar length to waste little
    padding; greedy by default (deterministic), sampling with `do_sample=True`.

    `compile_decode` uses a static KV cache and (on CUDA) a compiled decode step, see `compiled_decoding`;
    every batch then has the same size (the last one is filled up with repeats, whose pages are dropped) and
    one cache, sized for the longest prompt, so one compiled step serves every batch. With `batch_size=1`
    it runs our own loop, `decode_one`, instead of `generate`."""
    if not descriptions:
        raise ValueError("generate_pages needs at least one description")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    prompts = [build_prompt(d) for d in descriptions]
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    pages: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, do_sample, temperature, top_p, stop_at_html_end)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if compile_decode and batch_size == 1:
            ids = tokenizer(prompts[rows[0]], return_tensors="pt").input_ids.to(device)
            tokens = [t for piece in decode_one(model, tokenizer, ids, max_new_tokens, do_sample, temperature, top_p,
                                                stop_at_html_end) for t in piece]
            counts[rows[0]] = len(tokens)
            pages[rows[0]] = clean_page(tokenizer.decode(tokens, skip_special_tokens=True))
            continue
        filled = rows + rows[-1:] * (batch_size - len(rows)) if compile_decode and len(order) > batch_size else rows
        inputs = tokenizer([prompts[i] for i in filled], return_tensors="pt", padding=True).to(device)
        if compile_decode:
            cache = static_cache(model, len(filled), max(lengths) + max_new_tokens)
            output = _generate_with_cache(model, cache, **inputs, **kwargs)
        else:
            output = model.generate(**inputs, **kwargs)
        new = output[:len(rows), inputs["input_ids"].shape[1]:]
        for row, ids in zip(rows, new):
            ids = ids.tolist()
            # tokens up to and including the first EOS; rows that finished early are padded after it
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            while ids and ids[-1] == tokenizer.pad_token_id:
                ids.pop()
            counts[row] = len(ids)
            pages[row] = clean_page(tokenizer.decode(ids, skip_special_tokens=True))
    seconds = time.perf_counter() - started
    if was_training:
        model.train()
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
                "stop_at_html_end": stop_at_html_end, "compile_decode": compile_decode}
    return GenerationResult(pages, counts, seconds, settings)


def stream_page(model, tokenizer, description: str, max_new_tokens: int = 1024, do_sample: bool = False,
                temperature: float = 0.7, top_p: float = 0.95, compile_decode: bool = False) -> Iterator[str]:
    """Yield the page's text piece by piece as it is generated (for the playground); with `compile_decode`
    through `decode_one`, a piece every `STOP_CHECK_TOKENS` tokens."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    inputs = tokenizer([build_prompt(description)], return_tensors="pt").to(device)
    if compile_decode:
        model.eval()
        tokens: list[int] = []
        shown = ""
        for piece in decode_one(model, tokenizer, inputs["input_ids"], max_new_tokens, do_sample, temperature, top_p):
            tokens += piece
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back a character whose bytes are not all generated yet
                yield text[len(shown):]
                shown = text
        yield tokenizer.decode(tokens, skip_special_tokens=True)[len(shown):]
        return
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, do_sample, temperature, top_p, True)
    model.eval()

    worker = threading.Thread(target=lambda: model.generate(**inputs, **kwargs, streamer=streamer), daemon=True)
    worker.start()
    for piece in streamer:
        yield piece
    worker.join()
