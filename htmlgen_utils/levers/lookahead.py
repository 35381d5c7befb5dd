"""Drafts for greedy batch-1 decoding: the tokens that followed the latest earlier occurrence of the last few.

HTML repeats itself: closing tags, attribute names, class names, whole rows of a table or a list. When the last
tokens of the text so far (prompt and page) occurred before, the tokens that followed them then are a good
guess for what follows now ("prompt lookup decoding", Saxena 2023; transformers' `prompt_lookup_num_tokens`).
`decoding.decode_one(lookahead=...)` checks such a draft in one step (`few_tokens.py` reads the weights once
for all its tokens) and keeps the part the model agrees with. On the bundled pages, read with the tiny base's
tokenizer, a draft exists at ~59% of the steps and a step yields ~1.4 tokens (`bench/lookahead_drafts.py`).
"""
from __future__ import annotations

LOOKAHEAD_TOKENS = 4  # drafted tokens a check runs (plus the last token) when asked for: fixed for its graph
LONGEST_MATCH = 3  # the longest run of last tokens looked up (then shorter ones, down to one token)


class PromptLookup:
    """The text's tokens, indexed by every run of 1 to `LONGEST_MATCH` tokens whose next token is known."""

    def __init__(self, tokens: list[int], longest: int = LONGEST_MATCH, shortest: int = 1) -> None:
        self.tokens: list[int] = []
        self.longest = longest
        self.shortest = shortest  # runs shorter than this draft nothing: fewer checks, each more often right
        self.follows: dict[tuple[int, ...], int] = {}  # a run of tokens -> where its latest occurrence ended
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        """Append `tokens`, indexing the runs that end just before each of them (their next token is now known)."""
        for token in tokens:
            end = len(self.tokens)
            for n in range(1, min(self.longest, end) + 1):
                self.follows[tuple(self.tokens[end - n:end])] = end
            self.tokens.append(token)

    def draft(self, count: int) -> list[int]:
        """Up to `count` tokens that followed the latest earlier occurrence of the longest run of last tokens
        that occurred before, or [] if no run of `shortest` tokens or more did."""
        for n in range(min(self.longest, len(self.tokens)), self.shortest - 1, -1):
            end = self.follows.get(tuple(self.tokens[-n:]))
            if end is not None:
                return self.tokens[end:end + count]
        return []
