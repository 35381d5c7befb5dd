"""Stage 5a: write pages for descriptions with the trained model.

Batched (left padding, so every prompt ends where generation starts), KV cache on, and stopped per row
at EOS or at `</html>` (transformers' stop-string criterion), so a finished page costs no more tokens.
The output is the page only: the prompt is stripped and anything after `</html>` is cut.

`compile_decode=True` switches to the speed lever in `levers.decoding` (static KV cache, compiled step, and
our own loop for one prompt at a time); the pages are the same.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .levers.decoding import decode_one, generate_with_static_cache, static_cache
from .levers.fallback import fall_back, has_failed
from .packing import STOP_STRING, build_prompt


@dataclass
class GenerationResult:
    pages: list[str]
    new_tokens: list[int]  # tokens generated for each page (its EOS included)
    seconds: float
    settings: dict = field(default_factory=dict)
    endings: list[str] = field(default_factory=list)  # per page: "ended" | "token limit" | "repetition"

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / max(self.seconds, 1e-9)

    @property
    def examples_per_s(self) -> float:
        return len(self.pages) / max(self.seconds, 1e-9)

    def summary(self) -> dict:
        return {
            "examples": len(self.pages),
            "new_tokens": sum(self.new_tokens),
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "examples_per_s": round(self.examples_per_s, 4),
            "pages_ended": self.endings.count("ended"),
            "pages_at_token_limit": self.endings.count("token limit"),
            "pages_cut_for_repetition": self.endings.count("repetition"),
            **self.settings,
        }


LOOP_LINES = 8  # a page whose last this-many non-blank lines are one line repeated is stuck in a loop
LOOP_TOKENS = 64  # ... or whose last this-many tokens repeat one short cycle (one-line pages loop too: `<------...`)
LOOP_PERIOD = 16  # the longest cycle, in tokens, that counts


def repeats_one_cycle(tokens: list[int], window: int = LOOP_TOKENS, longest: int = LOOP_PERIOD) -> bool:
    """Whether the last `window` tokens are one cycle of at most `longest` tokens, repeated (`- - - -`,
    `<td></td><td></td>...`): at least four turns of the longest cycle, which real pages, minified or not, do
    not hold at their end while they are still being written."""
    tail = tokens[-window:]
    return len(tail) == window and any(tail[period:] == tail[:-period] for period in range(1, longest + 1))


def is_looping(text: str, tokens: list[int] | None = None) -> bool:
    """A generation stuck in a loop: its last `LOOP_LINES` lines are one line, or its last `LOOP_TOKENS` tokens
    one short cycle (given the tokens)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()][-LOOP_LINES:]
    return (len(lines) == LOOP_LINES and len(set(lines)) == 1) or (tokens is not None and repeats_one_cycle(tokens))


class RepetitionStop(StoppingCriteria):
    """Ends each row of a batch that is stuck in a loop (`is_looping`, checked every 16 tokens on the row's last
    512 tokens): a generation stuck in a loop would otherwise run to the token limit."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if (input_ids.shape[1] - self.prompt_length) % 16:
            return done
        for row, ids in enumerate(input_ids[:, self.prompt_length :][:, -512:].tolist()):
            done[row] = is_looping(self.tokenizer.decode(ids, skip_special_tokens=True), ids)
        return done


def clean_page(text: str) -> str:
    """The page text: everything up to and including the first `</html>`, surrounding whitespace removed."""
    end = text.find(STOP_STRING)
    if end >= 0:
        text = text[: end + len(STOP_STRING)]
    return text.strip()


def _generation_kwargs(
    tokenizer,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    stop_at_html_end: bool,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> dict:
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:  # plain greedy; silence sampling defaults a checkpoint's generation_config may carry
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if stop_at_html_end:
        kwargs.update(stop_strings=[STOP_STRING], tokenizer=tokenizer)
    return kwargs


COMPILED_DECODING = "compile_generation"
PLAIN_DECODING_COST = "generate() without a compiled step (slower tokens, the same pages)"


@torch.no_grad()
def generate_pages(
    model,
    tokenizer,
    descriptions: list[str],
    max_new_tokens: int = 1024,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    stop_at_html_end: bool = True,
    seed: int = 0,
    compile_decode: bool = False,
    progress: bool = False,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    stop_on_repetition: bool = True,
) -> GenerationResult:
    """Pages for `descriptions`, in their order. Prompts are batched by similar length to waste little
    padding; greedy by default (deterministic), sampling with `do_sample=True`.

    `compile_decode` uses a static KV cache and (on CUDA) a compiled decode step, see `compiled_decoding`;
    every batch then has the same size (a short one is filled up with repeats, whose pages are dropped) and
    one cache, sized for the longest prompt, so one compiled step serves every batch. With `batch_size=1`
    it runs our own loop, `decode_one`, instead of `generate`. `progress` shows a bar over the pages.
    `stop_on_repetition` ends a page stuck in a loop (`RepetitionStop`); `repetition_penalty` and
    `no_repeat_ngram_size` are `generate`'s own (off by default: HTML repeats its tags legitimately)."""
    if not descriptions:
        raise ValueError("generate_pages needs at least one description")
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    prompts = [build_prompt(d) for d in descriptions]
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    pages: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    picking = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                   no_repeat_ngram_size=no_repeat_ngram_size)  # fmt: skip
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, stop_at_html_end=stop_at_html_end, **picking)
    looping: list[bool] = [False] * len(prompts)
    compile_decode = compile_decode and not has_failed(model, COMPILED_DECODING)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    started = time.perf_counter()
    bar = tqdm(total=len(order), desc="generating", unit="page", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        if compile_decode and batch_size == 1:
            ids = tokenizer(prompts[rows[0]], return_tensors="pt").input_ids.to(device)
            tokens = []
            try:
                pieces = decode_one(model, tokenizer, ids, max_new_tokens, stop_at_html_end=stop_at_html_end, **picking)
                for piece in pieces:
                    tokens += piece
                    recent = tokens[-512:]
                    if stop_on_repetition and is_looping(tokenizer.decode(recent, skip_special_tokens=True), recent):
                        looping[rows[0]] = True
                        break
            except Exception as error:  # compiling, capturing or a kernel failed: this page again, plainly
                fall_back(model, COMPILED_DECODING, error, PLAIN_DECODING_COST)
                compile_decode = False
            else:
                counts[rows[0]] = len(tokens)
                pages[rows[0]] = clean_page(tokenizer.decode(tokens, skip_special_tokens=True))
                bar.update(1)
                continue
        # a compiled step is specialised to its batch size: a short batch is filled up with repeats
        filled = rows + rows[-1:] * (batch_size - len(rows)) if compile_decode else rows
        inputs = tokenizer([prompts[i] for i in filled], return_tensors="pt", padding=True).to(device)
        stopping = StoppingCriteriaList(
            [RepetitionStop(tokenizer, inputs["input_ids"].shape[1])] if stop_on_repetition else []
        )
        output = None
        if compile_decode:
            cache = static_cache(model, len(filled), max(lengths) + max_new_tokens)
            try:
                output = generate_with_static_cache(model, cache, **inputs, **kwargs, stopping_criteria=stopping)
            except Exception as error:  # compiling or capturing failed: this batch again, plainly
                fall_back(model, COMPILED_DECODING, error, PLAIN_DECODING_COST)
                compile_decode = False
                inputs = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True).to(device)
        if output is None:
            output = model.generate(**inputs, **kwargs, stopping_criteria=stopping)
        new = output[: len(rows), inputs["input_ids"].shape[1] :]
        for row, ids in zip(rows, new):
            ids = ids.tolist()
            # tokens up to and including the first EOS; rows that finished early are padded after it
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            while ids and ids[-1] == tokenizer.pad_token_id:
                ids.pop()
            counts[row] = len(ids)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            looping[row] = stop_on_repetition and is_looping(text, ids) and STOP_STRING not in text
            pages[row] = clean_page(text)
        bar.update(len(rows))
    seconds = time.perf_counter() - started
    bar.close()
    if was_training:
        model.train()
    settings = {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "stop_at_html_end": stop_at_html_end,
        "compile_decode": compile_decode,
        "repetition_penalty": repetition_penalty,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "stop_on_repetition": stop_on_repetition,
    }
    endings = [
        "repetition" if loop else "token limit" if n >= max_new_tokens else "ended" for loop, n in zip(looping, counts)
    ]
    return GenerationResult(pages, counts, seconds, settings, endings)


def stream_page(
    model,
    tokenizer,
    description: str,
    max_new_tokens: int = 1024,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.95,
    compile_decode: bool = False,
) -> Iterator[str]:
    """Yield the page's text piece by piece as it is generated (for the playground); with `compile_decode`
    through `decode_one`, a piece every `STOP_CHECK_TOKENS` tokens."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    inputs = tokenizer([build_prompt(description)], return_tensors="pt").to(device)
    if compile_decode and not has_failed(model, COMPILED_DECODING):
        model.eval()
        pieces = decode_one(model, tokenizer, inputs["input_ids"], max_new_tokens, do_sample, temperature, top_p)
        try:
            first = next(pieces)  # compiling, capturing and the first kernels run here
        except StopIteration:
            first = []
        except Exception as error:
            fall_back(model, COMPILED_DECODING, error, PLAIN_DECODING_COST)
            yield from stream_page(model, tokenizer, description, max_new_tokens, do_sample, temperature, top_p)
            return
        tokens: list[int] = []
        shown = ""
        for piece in itertools.chain([first], pieces):
            tokens += piece
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # hold back a character whose bytes are not all generated yet
                yield text[len(shown) :]
                shown = text
        yield tokenizer.decode(tokens, skip_special_tokens=True)[len(shown) :]
        return
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generation_kwargs(tokenizer, max_new_tokens, do_sample, temperature, top_p, True)
    model.eval()

    worker = threading.Thread(target=lambda: model.generate(**inputs, **kwargs, streamer=streamer), daemon=True)
    worker.start()
    for piece in streamer:
        yield piece
    worker.join()


def warm_up_decoding(model, tokenizer, max_new_tokens: int) -> None:
    """Compile and capture the one-page decode step now, for pages of up to `max_new_tokens` (it prints that it
    compiles), so that the first request to a server does not wait for it inside its HTTP call."""
    pieces = stream_page(model, tokenizer, "A warm-up page", max_new_tokens, compile_decode=True)
    next(pieces, None)
    pieces.close()
