"""Figures for the notebooks and the README, drawn from real run data with matplotlib."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from .packing import IGNORE_INDEX


def plot_token_lengths(lengths: list[int], block_size: int, title: str = "tokens per example"):
    """Histogram of example lengths against the block size: what the long-page policy will cut."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(lengths, bins=40, color="#4c72b0")
    ax.axvline(block_size, color="#c44e52", linestyle="--", label=f"max example tokens = {block_size}")
    over = sum(n > block_size for n in lengths)
    ax.set(
        xlabel="tokens (prompt + page + EOS)",
        ylabel="examples",
        title=f"{title}: {over} of {len(lengths)} longer than the limit",
    )
    ax.legend()
    fig.tight_layout()
    return fig


def plot_packing(blocks, max_blocks: int = 8, out: str | Path | None = None):
    """One row per packed block: each example's instruction (light) and response (dark), its EOS (black tick),
    and padding (grey). Drawn from real blocks' labels and position ids."""
    rows = min(max_blocks, len(blocks))
    fig, ax = plt.subplots(figsize=(10, 0.45 * rows + 1.2))
    palette = plt.get_cmap("tab10")
    for r in range(rows):
        positions = np.asarray(blocks[r]["position_ids"])
        labels = np.asarray(blocks[r]["labels"])
        starts = list(np.flatnonzero(positions == 0)) + [len(positions)]
        segment_index = 0
        for a, b in zip(starts[:-1], starts[1:]):
            is_padding = bool((labels[a:b] == IGNORE_INDEX).all()) and b == len(positions) and a > 0
            if is_padding:
                ax.barh(r, b - a, left=a, color="#dddddd", edgecolor="white")
                continue
            colour = palette(segment_index % 10)
            response = np.flatnonzero(labels[a:b] != IGNORE_INDEX)
            split = a + (response[0] if len(response) else b - a)
            ax.barh(r, split - a, left=a, color=colour, alpha=0.35, edgecolor="white")
            ax.barh(r, b - split, left=split, color=colour, alpha=0.9, edgecolor="white")
            ax.plot([b - 0.5, b - 0.5], [r - 0.4, r + 0.4], color="black", linewidth=1)
            segment_index += 1
    ax.set_yticks(range(rows), [f"block {r}" for r in range(rows)])
    ax.invert_yaxis()
    ax.set_xlabel("token position in block")
    ax.set_title("Packing: whole examples per block, position ids restart per example (attention stays inside)")
    ax.legend(
        handles=[
            Patch(color="#4c72b0", alpha=0.35, label="instruction (no loss)"),
            Patch(color="#4c72b0", alpha=0.9, label="response (loss)"),
            Patch(color="#dddddd", label="padding"),
            plt.Line2D([], [], color="black", label="EOS / example end"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.28),
        ncol=4,
        frameon=False,
    )
    fig.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, bbox_inches="tight")
    return fig


def plot_training(history: list[dict]):
    """Training loss, validation loss and learning rate against optimiser steps."""
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 3.5))
    ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", alpha=0.8)
    if evals:
        ax_loss.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="validation loss")
    skipped = [h["step"] for h in train if h.get("skipped")]
    if skipped:
        ax_loss.plot(skipped, [0] * len(skipped), "rx", label="skipped (non-finite)")
    ax_loss.set(xlabel="optimiser step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_lr.plot([h["step"] for h in train], [h["lr"] for h in train], color="#55a868")
    ax_lr.set(xlabel="optimiser step", ylabel="learning rate", title="warm-up + cosine schedule")
    fig.tight_layout()
    return fig


def plot_metric_bars(table, columns=("rougeL", "tree_bleu", "description_coverage", "block_match")):
    """Per-example scores as grouped bars, with valid pages (by the HTML standard) marked."""
    columns = [c for c in columns if c in table]
    x = np.arange(len(table))
    width = 0.8 / max(1, len(columns))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(table)), 3.5))
    for i, column in enumerate(columns):
        ax.bar(x + i * width, table[column], width, label=column)
    for xi, ok in zip(x, table["valid_html"]):
        ax.text(xi + 0.4 - width / 2, 1.02, "✓" if ok else "✗", ha="center", color="green" if ok else "red")
    ax.set(ylim=(0, 1.1), xlabel="test example", ylabel="score", title="scores per example (✓ = valid HTML)")
    ax.set_xticks(x + 0.4 - width / 2, [str(i + 1) for i in x])
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_lengths(table):
    """Generated vs reference page length: a model that never stops, or stops early, shows here."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter(table["reference_chars"], table["generated_chars"], alpha=0.7)
    top = max(table["reference_chars"].max(), table["generated_chars"].max(), 1)
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="same length")
    ax.set(xlabel="reference characters", ylabel="generated characters", title="page lengths")
    ax.legend()
    fig.tight_layout()
    return fig
