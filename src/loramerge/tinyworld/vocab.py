"""The tiny world's own CLIP vocabulary: vocab.json + merges.txt written by this code.

It follows CLIP's layout (byte-level symbols, "</w>" ends a word, specials last) and learns
byte-pair merges from a word list until every word is a single token, so a prompt such as
"a handwritten seven, bold" tokenizes like it would with a real CLIP tokenizer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..outputs import write_text
from .data import NUMBER_WORDS, TRIGGERS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # tokens per prompt, BOS and EOS included: room for five trigger words

# words that become single tokens; a few spare style words leave room for more LoRAs later
WORDS = (
    ("a", "an", "the", "handwritten", "digit", "number", "style", "and", "with", "in")
    + NUMBER_WORDS
    + tuple(TRIGGERS.values())
    + ("mirrored", "thin", "outlined", "framed", "inverted", "dotted")
)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent adjacent pair until each word is one token."""
    byte_char = bytes_to_unicode()
    pieces = []
    for word in dict.fromkeys(words):
        chars = [byte_char[b] for b in word.encode("utf-8")]
        pieces.append(chars[:-1] + [chars[-1] + "</w>"])
    merges = []
    while True:
        pairs = Counter(p for w in pieces for p in zip(w, w[1:]))
        if not pairs:
            return merges
        # most frequent first, ties broken alphabetically so the file is reproducible
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        pieces = [_merge(w, best) for w in pieces]


def _merge(word: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json and merges.txt (CLIP's file format) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(WORDS)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    write_text(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=0))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    write_text(directory / "merges.txt", "\n".join(lines) + "\n")
    return directory


def make_tokenizer(directory: str | Path):
    """A transformers ``CLIPTokenizer`` over the files written into ``directory``."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=MAX_LENGTH)
