"""A real byte-level BPE vocabulary for CLIPTokenizer in which each ShapesWorld word is one token.

CLIP's tokenizer needs the 256 byte symbols (with and without the end-of-word marker) to
encode any text, and merges whose results are all in the vocabulary. A words-only
vocabulary with no merges silently maps every word to `<|endoftext|>` on transformers 5.
Other words still encode, byte by byte.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from .captions import ATTRIBUTE_VALUES


MODEL_MAX_LENGTH = 24
END_OF_WORD = "</w>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's table of 256 printable characters standing for the 256 bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    by_byte = dict(zip(printable, codes))
    return [chr(by_byte[b]) for b in range(256)]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges by rank, lowest first, as CLIP's tokenizer does."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, float("inf")), i, pair) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, _, best = min(pairs)
        if rank == float("inf"):
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def vocabulary_words() -> list[str]:
    words = {"a", "at", "the", "on", "background"}
    for values in ATTRIBUTE_VALUES.values():
        for value in values:
            words.update(value.split())
    return sorted(words)


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Merges that turn each of `words` into a single token; a merge added later never splits an earlier word."""
    merges: list[tuple[str, str]] = []
    for word in words:
        while True:
            symbols = _bpe(list(word[:-1]) + [word[-1] + END_OF_WORD], {m: r for r, m in enumerate(merges)})
            if len(symbols) == 1:
                break
            merges.append((symbols[0], symbols[1]))
    byte_symbols = _bytes_to_unicode()
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json and merges.txt for the ShapesWorld vocabulary into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(vocabulary_words())
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def build_tokenizer(directory: str | Path) -> CLIPTokenizer:
    """A CLIPTokenizer over the ShapesWorld vocabulary, with its files written to `directory`."""
    write_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=MODEL_MAX_LENGTH)
