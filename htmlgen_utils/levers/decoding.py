"""Compiled decoding: a static KV cache, a compiled one-token step (CUDA graphs), and our own batch-1 loop.

A speed lever for generation on a GPU, with the workarounds of library internals it needs kept here, in one
place: the plain path (`generation.generate_pages` without `compile_decode`) never touches them.
One prompt at a time (the playground and the query API) skips `generate`: its per-token Python and its
every-token stop check (a host sync) cost more than the compiled step itself, so `decode_one` is a plain loop
that looks at its tokens only every `STOP_CHECK_TOKENS`. Its step is built for one token: attention of one
query as plain matmuls (`one_query_attention`), the LoRA matrices as multiply-and-sums the compiler fuses
(`OneTokenLinear`), q/k/v and gate/up as one layer each (`stacking.stacked_layers`), and its own CUDA graph
(`DecodeStep`); what remained was mostly bitsandbytes' 4-bit matrix-vector kernel. Our own, over a second copy
of the weights laid out for it (`column_words.py`), is the default where the kernel has run (compute capability
8.0+) and the GPU has room for the copy. The figures are in bench/RESULTS.md. Greedy decoding can also look ahead
(`lookahead.py`): a step that checks a continuation drafted from the text so far, several tokens in one pass
over the weights.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from ..config import gpu_is_verified
from ..packing import STOP_STRING
from .attention import FLEX_ATTENTION, PACKED_ATTENTION
from .compile import COMPILE_NOTE
from .fallback import fall_back, has_failed
from .few_tokens import FEW_TOKENS
from .lookahead import PromptLookup
from .stacking import SharedInput, shared_input_groups, stacked_layers


ONE_QUERY_ATTENTION = "htmlgen_one_query"


def one_query_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for a decode step: one new token (or the few of a lookahead check) against the whole KV cache,
    as two small matmuls and a softmax.

    SDPA's kernels are built for many queries. A static cache needs a mask (its unfilled slots), which rules out
    FlashAttention, and SDPA's memory-efficient kernel then gives one query a whole tile of work: on the 7B
    shape nearly a quarter of a decode step (bench/RESULTS.md). The plain form (what transformers' `eager`
    attention computes) is two batched matrix-vector products and a softmax that the compiler fuses with the
    mask. Anything with more than `FEW_TOKENS` queries (a prompt), or several queries and no mask (SDPA would
    make them causal), goes to transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if query.shape[2] > FEW_TOKENS or (query.shape[2] > 1 and attention_mask is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:  # SDPA's mask: True where the token may look, or an additive float mask
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _register_one_query_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ONE_QUERY_ATTENTION, one_query_attention)
    AttentionMaskInterface.register(ONE_QUERY_ATTENTION, sdpa_mask)  # the same mask SDPA gets


_register_one_query_attention()


class OneTokenLinear(torch.nn.Linear):
    """A LoRA matrix that multiplies a single token as a multiply-and-sum instead of a GEMM.

    At batch 1 each of a 7B model's 224 LoRA pairs is two tiny matrix products, and cuBLAS ran each as a gemv,
    a dot and a reduce kernel: over a thousand launches a token, a sixth of a decode step. Written as `(x * W).sum(-1)`
    the compiler generates the kernels itself and fuses them with their neighbours (the casts, the scaling,
    the add onto the 4-bit layer's output). Anything with more than one token is `nn.Linear` unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return super().forward(x)
        out = (x.unsqueeze(-2) * self.weight).sum(-1)
        return out if self.bias is None else out + self.bias


def use_one_token_lora(model) -> int:
    """Make every LoRA A and B matrix of `model` a `OneTokenLinear`, in place (the same weights; calling it
    again changes nothing). Returns how many it switched."""
    matrices = [linear for module in model.modules() for name in ("lora_A", "lora_B")
                if isinstance(getattr(module, name, None), torch.nn.ModuleDict)
                for linear in getattr(module, name).values()]
    plain = [linear for linear in matrices if type(linear) is torch.nn.Linear]
    for linear in plain:
        linear.__class__ = OneTokenLinear
    return len(plain)


@contextmanager
def compiled_decoding(model):
    """Let `generate` (and `decode_one`) run a compiled decode step for our 4-bit model.

    With a static KV cache, transformers compiles the one-token forward (`mode="reduce-overhead"`: CUDA graphs)
    on CUDA, which removes the per-token Python and kernel-launch overhead that bounds 4-bit + LoRA decoding
    (hundreds of small kernels a token). It refuses for every bitsandbytes model, a rule older than
    bitsandbytes' own support (4-bit layers compile since 0.46 with torch >= 2.8 and run in CUDA graphs since
    0.44), so the model's quantizer is hidden from that one check for the duration of the call. The first
    call of each batch size compiles (tens of seconds); later calls reuse it. Attention runs as
    `one_query_attention` for the call.

    A model prepared for training in this process carries transformers' hook that marks the embeddings'
    output as requiring grad (for gradient checkpointing); the compiler cannot trace it and would split the
    step in two graphs around it, so it is taken off for the call (no gradients are computed here) and put back.
    Taking it off and putting it back walks all the model's modules (milliseconds with a 7B model's LoRA layers), so
    `decode_one` does it once per piece of `STOP_CHECK_TOKENS` tokens, not per token.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(base, "hf_quantizer", None)
    hooked = hasattr(base, "_require_grads_hook")
    attention = base.config._attn_implementation
    base.hf_quantizer = None
    if attention in ("sdpa", PACKED_ATTENTION, FLEX_ATTENTION):  # all are SDPA for a decode step
        base.config._attn_implementation = ONE_QUERY_ATTENTION
    if hooked:
        base.disable_input_require_grads()
    try:
        yield
    finally:
        base.hf_quantizer = quantizer
        base.config._attn_implementation = attention
        if hooked:
            base.enable_input_require_grads()


def wants_compiled_decode(model, config) -> bool:
    """The config's `compile_generation` (`auto`: on GPUs of compute capability >= 8.0), on CUDA only (on CPU there
    is nothing to gain from compiling).

    Off under `auto` on a T4 for two reasons: the compiled step has never run there, and it would not pay for
    notebook 05's quick evaluation anyway. Timed on two cores with empty compiler caches (bench/RESULTS.md), the
    batch of 8 compiles once for the fine-tuned pass and again for the base model's (`disable_adapter` changes
    what the compiled graph guards on), and the tokens it then saves win that back only on pages longer than the
    quick evaluation's 768 tokens."""
    return config.compiles("compile_generation") and next(model.parameters()).device.type == "cuda"


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
        if next(model.parameters()).is_cuda:
            print(f"compile_generation: compiling the decode step for {batch_size} page(s) at a time, "
                  f"{key[1]} tokens ({COMPILE_NOTE}); later batches reuse it", flush=True)
        caches[key] = StaticCache(config=model.config, max_cache_len=key[1])
    caches[key].reset()
    return caches[key]


def generate_with_static_cache(model, cache, **kwargs):
    """`generate` with our static cache (passed as `past_key_values`, the name every transformers 4.56-5.x takes).

    The stacked groups of `decode_one` are built first if they are not yet: building them moves the members'
    4-bit weights into the stacked buffers, which must not happen after a compiled step recorded their addresses."""
    shared_input_groups(model)
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


class DecodeStep:
    """One token's forward with the static KV cache, captured once as a CUDA graph and replayed for every token.

    transformers' compiled step (`mode="reduce-overhead"`) replays through torch.compile's CUDA-graph trees,
    which on every call check guards and the addresses of all the model's tensors: with a 7B model's
    thousands of LoRA and 4-bit tensors that host work took longer than the GPU's step. Here the forward is
    compiled to plain generated kernels and captured into a `torch.cuda.CUDAGraph` that reads its token and
    position from two fixed buffers, so a token costs two small copies and one replay. Build it before the
    prompt is in the cache: warming up and capturing run the step on the cache (its own write counter moves
    too), so the cache is reset afterwards. On CPU there is no graph: the same step runs eagerly from the same
    buffers. `groups` (`stacking.shared_input_groups`) run as one layer each inside the step. With `tokens` > 1
    it is a lookahead check: that many tokens at consecutive positions, returning the greedy pick after each."""

    def __init__(self, model, cache, cache_name: str, device: torch.device, groups: list[SharedInput],
                 tokens: int = 1, column_words: bool = False):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.cache, self.cache_name, self.groups = model, cache, cache_name, groups
        self.column_words = column_words and tokens == 1
        if self.column_words:
            try:
                left_out = [group for group in groups if not group.build_column_words()]
            except Exception as error:  # the layout could not be built: bitsandbytes' layout for every group
                fall_back(model, "column_words", error, "the decode step reads bitsandbytes' 4-bit layout (slower)")
                for group in groups:
                    group.columns = None
                left_out, self.column_words = [], False
            if left_out and device.type == "cuda":  # (elsewhere there is no layout to build: nothing to say)
                print(f"column_words: {len(left_out)} of {len(groups)} projection groups keep bitsandbytes' layout "
                      "(not NF4 in blocks of 64, or no GPU memory to spare for a second copy of their weights)")
        self.token = torch.zeros((1, tokens), dtype=torch.long, device=device)
        self.position = torch.arange(tokens, device=device)
        self.forward = torch.compile(base, dynamic=False) if device.type == "cuda" else base
        self.graph = None
        if device.type == "cuda":
            with compiled_decoding(model):  # one graph, also for a model prepared for training
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # CUDA graphs are captured after warm-up runs on a side stream
                    for _ in range(2):
                        self._run()
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self._run()
            cache.reset()

    def _run(self) -> torch.Tensor:
        with stacked_layers(self.groups, self.column_words):
            logits = self.forward(input_ids=self.token, **{self.cache_name: self.cache}, cache_position=self.position,
                                  position_ids=self.position[None], use_cache=True).logits
        if self.token.shape[1] == 1:
            return logits[:, -1]
        picks = logits[0].argmax(-1)
        self._keep_agreed(picks)
        return picks

    def _keep_agreed(self, picks: torch.Tensor) -> None:
        """After a check, move the cache's write position to just after the draft tokens the model agreed with
        and its own pick: transformers' static cache (5.2x on) writes each layer at its own counter, not at
        `cache_position`, and the next step must overwrite what the check wrote for the rejected tokens. On the
        device, inside the graph: no host work. (Caches that write at `cache_position` have no counter.)"""
        agreed = (self.token[0, 1:] == picks[:-1]).long().cumprod(0).sum()
        for layer in getattr(self.cache, "layers", ()):
            counter = getattr(layer, "cumulative_length", None)
            if torch.is_tensor(counter):
                counter.copy_(self.position[0] + agreed + 1)

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The next token's logits after `token` at `position` (for a check: the greedy pick after each of its
        tokens). On CUDA the result is the graph's own output buffer: read it before the next call."""
        self.token.copy_(token)
        self.position.copy_(position)
        if self.graph is None:
            with compiled_decoding(self.model):
                return self._run()
        self.graph.replay()
        return self.logits


def decode_step(model, cache, cache_name: str, device: torch.device, groups: list[SharedInput],
                tokens: int = 1, column_words: bool = False) -> DecodeStep:
    """The `DecodeStep` of this static cache (and stacking, and token count), built at its first use (before the
    prompt goes in: building it resets the cache) and kept with it, as a graph is bound to its cache's tensors."""
    steps = model.__dict__.setdefault("_htmlgen_decode_steps", {})
    column_words = column_words and not has_failed(model, "column_words")
    key = (id(cache), bool(groups), tokens, column_words)
    if key not in steps:
        if device.type == "cuda":
            print(f"compile_generation: compiling and capturing the one-page decode step ({COMPILE_NOTE})", flush=True)
        steps[key] = DecodeStep(model, cache, cache_name, device, groups, tokens, column_words)
    return steps[key]


@torch.no_grad()
def decode_one(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
               temperature: float = 0.7, top_p: float = 0.95, stop_at_html_end: bool = True,
               stack_projections: bool = True, lookahead: int = 0, column_words: bool | None = None,
               counts: dict | None = None) -> Iterator[list[int]]:
    """One prompt's new tokens (its EOS included), yielded in pieces as they are read back.

    Prefill the static cache with the prompt, then one `DecodeStep` a token (on CUDA a CUDA-graph replay; on
    CPU the same loop runs eagerly), with q/k/v and gate/up stacked unless `stack_projections` is False. The
    tokens stay on the GPU and are read back every `STOP_CHECK_TOKENS`, so the host launches steps ahead of the
    GPU instead of waiting for each; a page that ends mid-piece is cut where it ended (up to
    `STOP_CHECK_TOKENS` tokens were computed for nothing). With `lookahead` > 0 (e.g. `LOOKAHEAD_TOKENS`),
    greedy decoding with stacking checks drafts of that many tokens (`_decode_looking_ahead`); off by default,
    as it measured slower than the one-token loop (a check costs about two steps; bench/RESULTS.md). With
    `column_words` (default: on GPUs of compute capability >= 8.0, where its kernel has run; on CUDA, with
    stacking) the one-token step's 4-bit products read a copy of the weights laid out for decoding
    (`column_words.py`), built where the GPU keeps a quarter of its memory free besides (the copy is as large as
    the 4-bit weights); `column_words=False` keeps bitsandbytes' layout and that memory. `counts`, if given,
    receives its steps."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if column_words is None:  # on by default only where its kernel has run: compute capability >= 8.0
        column_words = gpu_is_verified()
    use_one_token_lora(model)
    length = input_ids.shape[1]
    looking_ahead = lookahead > 0 and not do_sample and stack_projections
    room = length + max_new_tokens + (lookahead if looking_ahead else 0)  # a last check may reach past the end
    cache = static_cache(model, 1, room)
    pick = _token_picker(do_sample, temperature, top_p)
    # the KV cache argument is `cache` from transformers 5.2x on, `past_key_values` before
    cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    positions = torch.arange(room, device=input_ids.device)
    # built at the first call either way: the members' weights then move into the stacked buffers, which must
    # happen before any step is captured (a CUDA graph keeps reading the addresses it was captured with)
    groups = shared_input_groups(model)
    step = decode_step(model, cache, cache_name, input_ids.device, groups if stack_projections else [],
                       column_words=column_words and stack_projections)
    check = decode_step(model, cache, cache_name, input_ids.device, groups, lookahead + 1) if looking_ahead else None
    logits = base(input_ids=input_ids, **{cache_name: cache}, cache_position=positions[:length], use_cache=True,
                  logits_to_keep=1).logits[:, -1]
    if check is not None:
        yield from _decode_looking_ahead(step, check, tokenizer, input_ids, logits, positions, max_new_tokens,
                                         stop_at_html_end, counts)
        return
    new = torch.empty((1, max_new_tokens), dtype=torch.long, device=input_ids.device)
    tokens: list[int] = []
    for start in range(0, max_new_tokens, STOP_CHECK_TOKENS):
        stop = min(start + STOP_CHECK_TOKENS, max_new_tokens)
        for i in range(start, stop):
            token = pick(logits)
            new[:, i] = token[:, 0]
            if i + 1 < max_new_tokens:  # launched before the read-back below, so the GPU keeps working
                logits = step(token, positions[length + i:length + i + 1])
        checked = len(tokens)
        tokens += new[0, checked:stop].tolist()
        end = _stop_index(tokenizer, tokens, checked, stop_at_html_end)
        yield tokens[checked:end]
        if end is not None:
            return


def _decode_looking_ahead(step: DecodeStep, check: DecodeStep, tokenizer, input_ids: torch.Tensor,
                          logits: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                          stop_at_html_end: bool, counts: dict | None) -> Iterator[list[int]]:
    """Greedy decoding that checks drafted continuations (prompt lookup, `lookahead.PromptLookup`).

    Where the text so far has an earlier occurrence of its last tokens, the tokens that followed it are the
    draft: one `check` step runs the last token and the draft through the model at once and returns its greedy
    pick after each; the draft's tokens are kept up to the first the model would not have picked, plus the
    model's own pick there. Every kept token is one the model picks greedily after the tokens before it, so
    the page is the one-token loop's page (up to floating-point ties between the two steps' arithmetic). With
    no draft, one ordinary step. The host reads each step's picks back before drafting the next, so the GPU
    waits for it between steps (a fraction of a millisecond)."""
    lookahead = check.token.shape[1] - 1
    length = input_ids.shape[1]
    token = int(logits.argmax(-1))  # the first new token: it goes into the cache at `position`
    tokens, position, checked = [token], length, 0
    lookup = PromptLookup(input_ids[0].tolist() + tokens)
    steps = checks = 0
    try:
        while True:
            while len(tokens) - checked < STOP_CHECK_TOKENS and len(tokens) < max_new_tokens:
                draft = lookup.draft(lookahead)
                if draft:
                    guess = draft + draft[-1:] * (lookahead - len(draft))  # a check has a fixed size: pad it
                    picks = check(torch.tensor([[token] + guess]),
                                  positions[position:position + lookahead + 1]).tolist()
                    agreed = next((i for i in range(lookahead) if guess[i] != picks[i]), lookahead)
                    new = guess[:agreed] + [picks[agreed]]
                    checks += 1
                else:
                    new = [int(step(torch.tensor([[token]]), positions[position:position + 1]).argmax(-1))]
                steps += 1
                position += len(new)
                token = new[-1]
                tokens += new
                lookup.extend(new)
            del tokens[max_new_tokens:]
            # read back in pieces of STOP_CHECK_TOKENS, as the one-token loop does, and the rest at the limit
            at_limit = len(tokens) == max_new_tokens
            while len(tokens) - checked >= STOP_CHECK_TOKENS or (at_limit and checked < len(tokens)):
                piece_end = min(checked + STOP_CHECK_TOKENS, len(tokens))
                end = _stop_index(tokenizer, tokens[:piece_end], checked, stop_at_html_end)
                yield tokens[checked:piece_end if end is None else end]
                if end is not None:
                    return
                checked = piece_end
            if at_limit:
                return
    finally:
        if counts is not None:
            counts.update(steps=steps, checks=checks, tokens=len(tokens))
