"""A real CLIP BPE tokenizer, offline.

OpenAI's CLIP vocabulary ships as `bpe_simple_vocab_16e6.txt.gz` inside the PyPI packages
`openai-clip` and `open-clip-torch`. `CLIPTokenizer` wants `vocab.json` + `merges.txt`; both follow
from the merge list: 256 byte symbols, the same with the end-of-word mark, one token per merge
(the first 48,894), then the two special tokens — 49,408 entries, the size SD1.x/SD2.x use.
The derived files are shipped in `esd/configs/clip_tokenizer/`; `write_clip_tokenizer` re-derives them.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2  # the slice OpenAI's own SimpleTokenizer keeps
TOKENIZER_DIR = Path(__file__).parent / "configs" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode table, in CLIP's vocabulary order.

    Printable bytes map to themselves and come first; the rest get code points from 256 up and
    follow. The order matters: it fixes the first 256 token ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def write_clip_tokenizer(bpe_gz: str | Path, out_dir: str | Path = TOKENIZER_DIR) -> Path:
    """Derive `vocab.json`, `merges.txt` and configs for `CLIPTokenizer` from OpenAI's bpe file."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "model_max_length": 77,  # without it pipelines overflow the 77-position CLIP text model
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def clip_tokenizer(path: str | Path = TOKENIZER_DIR, **overrides) -> CLIPTokenizer:
    """Load the shipped (or a given) CLIP tokenizer folder, offline; `pad_token="!"` gives SD2's."""
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, **overrides)


def padded_ids(texts: list[str]):
    """Token ids (n, 77) of the shipped tokenizer, padded and truncated exactly as an SD pipeline pads prompts."""
    tok = clip_tokenizer()
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def t5_tokenizer(max_length: int = 512):
    """A T5-style SentencePiece-unigram tokenizer built offline with the `tokenizers` library, for tiny test
    pipelines (SD3's third and FLUX's second text encoder are T5): "▁"-prefixed word pieces, single printable
    characters as the pieces every word falls back to, `</s>` appended, `<pad>` id 0 — T5's conventions,
    with a vocabulary of 195 instead of 32,128."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("▁" + c, -3.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


# A chat template of Qwen's form, enough for a pipeline that wraps the prompt as one user turn (FLUX.2 klein).
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def qwen_tokenizer(max_length: int = 512):
    """A Qwen2-style byte-level BPE tokenizer built offline with the `tokenizers` library, for tiny test pipelines
    (FLUX.2 klein's text encoder is Qwen3): the 256 byte symbols and no merges (every byte its own token), Qwen's
    special tokens and a chat template of its form — Qwen's conventions with a vocabulary of 259, not 151,646."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    out = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                             bos_token=None, model_max_length=max_length, additional_special_tokens=["<|im_start|>"])
    out.chat_template = CHAT_TEMPLATE
    return out
