"""Turning a growing list of token ids into text pieces that never split a character.

Byte-level BPE splits a Korean syllable (3 UTF-8 bytes) across tokens, and decoding such a token alone
gives U+FFFD. We decode a short window that starts at a clean boundary and emit only text that ends
cleanly, so the pieces join to exactly ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: a token boundary where decoding is known to be clean
        self._read = 0  # tokens up to here have been turned into emitted text

    def add(self, token_ids) -> str:
        """Append tokens; return the newly completed text (may be empty while a character is split)."""
        self.ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever remains, even an incomplete character (the sequence has ended)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        done = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if not final and (len(text) <= len(done) or text.endswith(REPLACEMENT)):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done) :]
