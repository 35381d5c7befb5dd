"""Compiled decoding: a static KV cache, a compiled one-token step, and our own loop for one prompt at a time.

A speed lever for generation on a GPU (`Config.compile_generation`). The plain path, `generate` without
`compile_decode`, never touches what is here. Batches run `generate` over a static cache with a compiled step.
One prompt at a time (the playground, the API) runs `decode_one`: `generate`'s per-token Python and its
every-token stop check cost more than the step itself, so the loop reads its tokens back only every
`STOP_CHECK_TOKENS`. Its step is built for one token: attention of one query as plain matmuls and the LoRA
matrices as multiply-and-sums the compiler fuses, all captured in one CUDA graph (`DecodeStep`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..packing import STOP_STRING
from .attention import FLEX_ATTENTION, PACKED_ATTENTION
from .compile import COMPILE_NOTE

ONE_QUERY_ATTENTION = "htmlgen_one_query"


def one_query_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention of one new token against the KV cache as two small matmuls and a softmax (what transformers'
    `eager` attention computes). A static cache needs a mask, which rules out FlashAttention, and SDPA's
    memory-efficient kernel gives one query a whole tile of work. More than one query (a prompt) goes to SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if query.shape[2] > 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:  # SDPA's mask: True where the token may look, or an additive float mask
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _register_one_query_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ONE_QUERY_ATTENTION, one_query_attention)
    AttentionMaskInterface.register(ONE_QUERY_ATTENTION, sdpa_mask)  # the same mask SDPA gets


_register_one_query_attention()


class OneTokenLinear(torch.nn.Linear):
    """A LoRA matrix that multiplies a single token as a multiply-and-sum, which the compiler fuses with its
    neighbours, instead of a GEMM launch each (a 7B model has 224 LoRA pairs). More tokens: `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1:
            return super().forward(x)
        out = (x.unsqueeze(-2) * self.weight).sum(-1)
        return out if self.bias is None else out + self.bias


def use_one_token_lora(model) -> int:
    """Make every LoRA A and B matrix of `model` a `OneTokenLinear`, in place; returns how many it switched."""
    matrices = [
        linear
        for module in model.modules()
        for name in ("lora_A", "lora_B")
        if isinstance(getattr(module, name, None), torch.nn.ModuleDict)
        for linear in getattr(module, name).values()
    ]
    plain = [linear for linear in matrices if type(linear) is torch.nn.Linear]
    for linear in plain:
        linear.__class__ = OneTokenLinear
    return len(plain)


@contextmanager
def compiled_decoding(model):
    """Let `generate` (and `decode_one`) run a compiled step over our 4-bit model, for the call.

    transformers refuses to compile any bitsandbytes model, a rule older than bitsandbytes' own support (4-bit
    layers compile since 0.46 with torch >= 2.8), so the quantizer is hidden from that check. Attention runs as
    `one_query_attention`. The hook a model prepared for training carries (it marks the embeddings' output as
    requiring grad) would split the compiled step in two graphs: it is lifted for the call and put back."""
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
    """`compile_generation` on (`auto`: compute capability >= 8.0, where it has run), on CUDA only. On a T4 it
    would not pay for notebook 05's quick evaluation either: the compiles cost more than the tokens save."""
    return config.compiles("compile_generation") and next(model.parameters()).device.type == "cuda"


CACHE_LENGTH_STEP = 256  # static caches are sized in steps of this, so prompts of similar length share one


def static_cache(model, batch_size: int, tokens: int):
    """A static KV cache for `batch_size` rows of at least `tokens`, kept on the model and reused: a compiled
    step is specialised to its cache, so the shortest cache already built that is long enough is taken."""
    from transformers import StaticCache

    caches = model.__dict__.setdefault("_htmlgen_static_caches", {})
    long_enough = [key for key in caches if key[0] == batch_size and key[1] >= tokens]
    if long_enough:
        key = min(long_enough, key=lambda k: k[1])
    else:
        key = (batch_size, -(-tokens // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP)
    if key not in caches:
        if next(model.parameters()).is_cuda:
            print(
                f"compile_generation: compiling the decode step for {batch_size} page(s) at a time, {key[1]} tokens "
                f"({COMPILE_NOTE}); later batches reuse it",
                flush=True,
            )
        caches[key] = StaticCache(config=model.config, max_cache_len=key[1])
    caches[key].reset()
    return caches[key]


def generate_with_static_cache(model, cache, **kwargs):
    """`generate` over our static cache, compiled (`compiled_decoding`)."""
    with compiled_decoding(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        return model.generate(**kwargs, past_key_values=cache)


STOP_CHECK_TOKENS = 16  # the loop reads its new tokens back (one host sync) this often, to see if the page ended


def logits_processors(model, prompt_length: int, **settings):
    """The logits processors `generate` applies for these settings (`do_sample`, `temperature`, `top_p`,
    `repetition_penalty`, `no_repeat_ngram_size`) over the model's generation config, built by `generate`'s own
    code, so that `decode_one` picks the tokens `generate` picks (top-k 50 included, where sampling)."""
    config = model._prepare_generation_config(None, **settings)[0]  # the defaults `generate` fills in, top-k 50
    return model._get_logits_processor(config, input_ids_seq_length=prompt_length, device=str(model.device))


def _stop_index(tokenizer, tokens: list[int], checked: int, stop_at_html_end: bool) -> int | None:
    """How many of `tokens` make the page (through EOS, or through the token that completes `</html>`), or
    None if it goes on. Only the tokens after the first `checked` are new."""
    new = tokens[checked:]
    eos_end = checked + new.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in new else None
    page = tokens[:eos_end]
    if stop_at_html_end and STOP_STRING in tokenizer.decode(page, skip_special_tokens=True):
        return next(
            end
            for end in range(checked + 1, len(page) + 1)
            if STOP_STRING in tokenizer.decode(page[:end], skip_special_tokens=True)
        )
    return eos_end


def adapter_state(model) -> tuple:
    """What a LoRA layer computes with: its active adapters and whether they are disabled or merged."""
    layer = next((module for module in model.modules() if hasattr(module, "lora_A")), None)
    if layer is None:
        return ()
    return tuple(layer.active_adapters), bool(layer.disable_adapters), bool(getattr(layer, "merged", False))


class DecodeStep:
    """One token's forward with the static KV cache, captured once as a CUDA graph and replayed for every token.

    transformers' compiled step replays through CUDA-graph trees, which check the addresses of all the model's
    tensors on every call: with thousands of LoRA and 4-bit tensors that host work took longer than the GPU's
    step. Here the forward is compiled and captured into a `torch.cuda.CUDAGraph` that reads its token and position
    from two fixed buffers, so a token costs two small copies and one replay. Building it runs the step on the
    cache, so the cache is reset afterwards. On CPU the same step runs eagerly from the same buffers."""

    def __init__(self, model, cache, cache_name: str, device: torch.device):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model, self.cache, self.cache_name = model, cache, cache_name
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.forward = torch.compile(base, dynamic=False) if device.type == "cuda" else base
        self.graph = None
        if device.type == "cuda":
            with compiled_decoding(model):
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
        cache = {self.cache_name: self.cache}
        position_ids = self.position[None]
        out = self.forward(
            input_ids=self.token, **cache, cache_position=self.position, position_ids=position_ids, use_cache=True
        )
        return out.logits[:, -1]

    def __call__(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The next token's logits after `token` at `position`; on CUDA the graph's own output buffer."""
        self.token.copy_(token)
        self.position.copy_(position)
        if self.graph is None:
            with compiled_decoding(self.model):
                return self._run()
        self.graph.replay()
        return self.logits


def decode_step(model, cache, cache_name: str, device: torch.device) -> DecodeStep:
    """The `DecodeStep` for this cache and adapter state, built at its first use (before the prompt goes
    in: building it resets the cache) and kept. A graph replays what it captured, so a step captured with the
    adapter on must never serve a call with it off (`disable_adapter`): the adapter state is part of the key."""
    steps = model.__dict__.setdefault("_htmlgen_decode_steps", {})
    key = (id(cache), adapter_state(model))
    if key not in steps:
        if device.type == "cuda":
            print(f"compile_generation: compiling and capturing the one-page decode step ({COMPILE_NOTE})", flush=True)
        steps[key] = DecodeStep(model, cache, cache_name, device)
    return steps[key]


@torch.no_grad()
def decode_one(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
               temperature: float = 0.7, top_p: float = 0.95, stop_at_html_end: bool = True,
               repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> Iterator[list[int]]:  # fmt: skip
    """One prompt's new tokens (its EOS included), yielded in pieces as they are read back.

    Prefill the static cache with the prompt, then one `DecodeStep` a token. The tokens stay on the GPU and are
    read back every `STOP_CHECK_TOKENS`, so the host launches steps ahead of the GPU; a page that ends mid-piece
    is cut where it ended. Tokens are picked with `generate`'s logits processors for the same settings."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    use_one_token_lora(model)
    length = input_ids.shape[1]
    cache = static_cache(model, 1, length + max_new_tokens)
    process = logits_processors(
        model,
        length,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    # the KV cache argument is `cache` from transformers 5.2x on, `past_key_values` before
    cache_name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    step = decode_step(model, cache, cache_name, input_ids.device)
    positions = torch.arange(length + max_new_tokens, device=input_ids.device)
    sequence = torch.cat([input_ids, input_ids.new_zeros((1, max_new_tokens))], 1)  # what the processors see
    prompt = {cache_name: cache, "cache_position": positions[:length], "use_cache": True, "logits_to_keep": 1}
    logits = base(input_ids=input_ids, **prompt).logits[:, -1]
    tokens: list[int] = []
    for start in range(0, max_new_tokens, STOP_CHECK_TOKENS):
        stop = min(start + STOP_CHECK_TOKENS, max_new_tokens)
        for i in range(start, stop):
            scores = process(sequence[:, : length + i], logits.float())
            token = torch.multinomial(scores.softmax(-1), 1) if do_sample else scores.argmax(-1, keepdim=True)
            sequence[:, length + i] = token[:, 0]
            if i + 1 < max_new_tokens:  # launched before the read-back below, so the GPU keeps working
                logits = step(token, positions[length + i : length + i + 1])
        checked = len(tokens)
        tokens += sequence[0, length + checked : length + stop].tolist()
        end = _stop_index(tokenizer, tokens, checked, stop_at_html_end)
        yield tokens[checked:end]
        if end is not None:
            return
