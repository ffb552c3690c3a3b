"""How far apart the text encoder keeps concept words, measured and as a training penalty.

ESD-x edits cross-attention keys and values, linear maps without bias of the text encoder's outputs. If the
outputs for "circle" and "square" point the same way (cosine 0.99 in the first testbed), any edit that
answers one word answers the other: erasures spill. Real CLIP keeps concept tokens far apart; the testbed's
encoder is trained with `distinct_penalty` so that it does too, and its model card records `similarity_report`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from esd.testbed.captions import phrase
from esd.testbed.render import COLOURS, SHAPES, STYLES
from esd.tokenizer import clip_tokenizer, padded_ids

WORDS = SHAPES + COLOURS + STYLES


def word_position(ids: list[int], word_ids: list[int]) -> int | None:
    """Index of the word's last token in a token id list (a word may be several BPE tokens), or None."""
    n = len(word_ids)
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == word_ids:
            return i + n - 1
    return None


def probes() -> tuple[list[str], list[tuple[int, int, str]]]:
    """Prompts and (prompt index, token position, label) of the vectors compared.

    Labels are concept words at their own (last) token, in the bare prompt ("circle") and in context
    ("a red circle, striped"), and "eos:{prompt}" for the end-of-text token of each bare word and of "",
    which carries what the whole prompt says to every padded position.
    """
    tok = clip_tokenizer()
    word_ids = {w: tok(w).input_ids[1:-1] for w in WORDS}  # without BOS and EOS
    prompts = ["", *WORDS]
    prompts += [phrase(s, c, y) for s in SHAPES for c in COLOURS for y in STYLES]
    picks = []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt).input_ids
        for w in WORDS:
            pos = word_position(ids, word_ids[w])
            if pos is not None:
                picks.append((i, pos, w))
        if i <= len(WORDS):  # "" and the bare words
            picks.append((i, len(ids) - 1, f"eos:{prompt}"))
    return prompts, picks


def probe_vectors(text_encoder: torch.nn.Module, tokens: torch.Tensor, picks: list[tuple[int, int, str]]) -> torch.Tensor:
    """The encoder's outputs at the picked positions, (len(picks), D)."""
    hidden = text_encoder(tokens.to(text_encoder.device))[0]  # (n, 77, D)
    rows = torch.tensor([p for p, _, _ in picks], device=hidden.device)
    cols = torch.tensor([c for _, c, _ in picks], device=hidden.device)
    return hidden[rows, cols]


def pair_mask(labels: list[str]) -> torch.Tensor:
    """(n, n) bool: pairs of vectors with different labels (each unordered pair once)."""
    n = len(labels)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, j in itertools.combinations(range(n), 2):
        mask[i, j] = labels[i] != labels[j]
    return mask


def distinct_penalty(vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity over the masked pairs: 0 when different words are orthogonal."""
    unit = F.normalize(vectors, dim=-1)
    cos = unit @ unit.T
    return cos[mask.to(cos.device)].pow(2).mean()


@torch.no_grad()
def similarity_report(text_encoder: torch.nn.Module) -> dict[str, float]:
    """Cosine similarity between different concept words at their token (bare and in context) and at EOS.

    Returns mean and max over pairs of different words: `word_*` (concept tokens, the issue's measure),
    `same_kind_*` (e.g. circle vs square only, in the same context) and `eos_*` (end-of-text of bare words and "").
    """
    prompts, picks = probes()
    vecs = F.normalize(probe_vectors(text_encoder, padded_ids(prompts), picks).float(), dim=-1)
    cos = vecs @ vecs.T
    labels = [lab for _, _, lab in picks]
    rows = [p for p, _, _ in picks]
    out = {}
    groups = {
        "word": lambda i, j: not labels[i].startswith("eos:") and not labels[j].startswith("eos:"),
        "same_kind": lambda i, j: rows[i] != rows[j] and _same_kind(labels[i], labels[j]) and _same_context(
            prompts[rows[i]], prompts[rows[j]], labels[i], labels[j]),
        "eos": lambda i, j: labels[i].startswith("eos:") and labels[j].startswith("eos:"),
    }
    for name, keep in groups.items():
        vals = [float(cos[i, j]) for i, j in itertools.combinations(range(len(picks)), 2)
                if labels[i] != labels[j] and keep(i, j)]
        out[f"{name}_mean"], out[f"{name}_max"] = sum(vals) / len(vals), max(vals)
    return out


def _same_kind(a: str, b: str) -> bool:
    return any(a in ws and b in ws for ws in (SHAPES, COLOURS, STYLES))


def _same_context(prompt_a: str, prompt_b: str, a: str, b: str) -> bool:
    """The two prompts differ only in the compared word ("a red circle, striped" vs "a red square, striped")."""
    return prompt_a.replace(a, "*") == prompt_b.replace(b, "*")
