"""A word tokenizer over a fixed vocabulary: the templated text of chapter 7 has 47 words, so no BPE is needed.

    tok = WordTokenizer()                 # specials, then vitlab.vlm.data.VOCAB: ids never change
    tok.encode("what colour is the circle")      [32, 33, 36, 31, 10]
    ids, mask = tok.batch_encode(["yes", "a red circle"], eos=True)   # [2, 4] right-padded with <pad>

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<img>`` 3, ``<unk>`` 4, then the words in the order given.
Text is lower-cased and split into words, single punctuation marks and ``<special>`` tokens; a word outside
the vocabulary becomes ``<unk>``.
"""
from __future__ import annotations

import re

import torch

from vitlab.checks import check_int

__all__ = ["WordTokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<img>", "<unk>")
_SPLIT = re.compile(r"<[a-z]+>|[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    def __init__(self, words=None):
        if words is None:
            from .data import VOCAB

            words = VOCAB
        if isinstance(words, str) or not all(isinstance(w, str) for w in words):
            raise TypeError(f"WordTokenizer: words must be a sequence of str, got {words!r}")
        bad = [w for w in words if _SPLIT.findall(w.lower()) != [w]]
        if bad:
            raise ValueError(f"WordTokenizer: words must be single lower-case tokens (a word or one punctuation "
                             f"mark), got {bad}")
        self.itos = list(SPECIAL_TOKENS) + [w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.img_id, self.unk_id = range(len(SPECIAL_TOKENS))

    def __len__(self) -> int:
        return len(self.itos)

    @staticmethod
    def split(text: str) -> list[str]:
        if not isinstance(text, str):
            raise TypeError(f"WordTokenizer: text must be a str, got {type(text).__name__}")
        return _SPLIT.findall(text.lower())

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.stoi.get(w, self.unk_id) for w in self.split(text)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """Words joined by spaces; ``skip_special`` drops <pad>, <bos>, <eos> and <img> (never <unk>)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"WordTokenizer.decode: ids must be ints in 0..{len(self) - 1}, got {bad[:5]}")
        drop = {self.pad_id, self.bos_id, self.eos_id, self.img_id} if skip_special else set()
        return " ".join(self.itos[i] for i in ids if i not in drop)

    def batch_encode(self, texts, max_len: int | None = None, *, bos: bool = False, eos: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [B, L] right-padded with <pad>, and mask bool [B, L] (True on real tokens).
        L = ``max_len``, or the longest text when None; a longer text is an error, never cut silently."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise TypeError(f"WordTokenizer.batch_encode: texts must be a non-empty list of str, got {texts!r}")
        rows = [self.encode(t, bos=bos, eos=eos) for t in texts]
        longest = max(len(r) for r in rows)
        if max_len is None:
            max_len = max(longest, 1)
        check_int(max_len, "max_len", "WordTokenizer.batch_encode")
        if longest > max_len:
            raise ValueError(f"WordTokenizer.batch_encode: a text has {longest} tokens, more than max_len={max_len}")
        ids = torch.full((len(rows), max_len), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask = torch.arange(max_len) < torch.tensor([len(r) for r in rows])[:, None]
        return ids, mask

    def __repr__(self) -> str:
        words = len(self) - len(SPECIAL_TOKENS)
        return f"WordTokenizer({len(self)} tokens: {len(SPECIAL_TOKENS)} special + {words} words)"
