"""Phrasings of a concept and what each keeps: the opt-in --contexts and --retain of `esd erase`.

Paper Eq. 5 guides away from the concept c starting from the empty prompt. A concept also stands inside
longer prompts ("a red circle"), where the words around it carry other concepts that must survive. A
*context* is a phrasing with `{}` standing for the concept ("a red {}"); its *anchor* is the same phrasing
without the concept ("a red"). Training on the phrasing with the guidance starting from the anchor,

    target = ε*(x_t, a, t) − η · (ε*(x_t, a+c, t) − ε*(x_t, a, t)),

removes c and only c: for the context "{}" the anchor is "" and this is Eq. 5 itself (docs/design.md,
"Phrasings and retained prompts").
"""

from __future__ import annotations

import re

ARTICLES = ("a", "an", "the")


def phrase(context: str, concept: str) -> str:
    """The prompt: `context` with the concept in place of `{}`."""
    return context.replace("{}", concept)


def anchor(context: str) -> str:
    """The phrasing without the concept: "a red {}" -> "a red", "a {}, striped" -> "striped", "{}" -> "".

    An article left without its noun goes with the concept, and so does the punctuation left dangling.
    """
    text = context.replace("{}", " ")
    text = re.sub(rf"\b({'|'.join(ARTICLES)})\s*(?=,|$)", " ", text.strip(), flags=re.IGNORECASE)
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "a red , , x" -> "a red, x"
    text = re.sub(r"\s+,", ",", text)
    return re.sub(r"\s+", " ", text).strip(" ,")


def names(prompt: str, concept: str) -> bool:
    """Does `prompt` name `concept` (whole words, any case)?"""
    return re.search(rf"(?<!\w){re.escape(concept.strip())}(?!\w)", prompt, flags=re.IGNORECASE) is not None


def retain_pool(prompts: list[str], concepts: list[str]) -> list[str]:
    """The prompts to hold to the frozen model: `prompts` minus those naming a concept being erased, and minus
    those a concept names ("circle" is not held while erasing "a circle": the two would pull against each other)."""
    return [p for p in prompts if not any(names(p, c) or (p.strip() and names(c, p)) for c in concepts)]
