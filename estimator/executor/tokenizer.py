"""Tokenizers for the executor: a model's own ``tokenizer.json`` through the ``tokenizers``
library, or a byte-level fallback (256 byte ids + BOS + EOS) for models without one.

Both offer the same small interface: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``vocab_size`` and ``eos_id`` (``bos_id`` where there is one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from estimator.errors import ConfigError

EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")


class TokenizerLike(Protocol):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, BOS = 256, EOS = 257 (vocab 258); lossless on any text."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` from tokenizer.json; EOS/BOS from the model's config files or
    the usual special-token names. No special tokens are added by ``encode``."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ConfigError(f"{path / 'tokenizer.json'}: cannot be loaded ({exc})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(path / "config.json")
        self.eos_id = _first_id(config.get("eos_token_id")) if config else None
        if self.eos_id is None:
            self.eos_id = self._special_id(_special_name(path, "eos_token"), EOS_NAMES)
        self.bos_id = _first_id(config.get("bos_token_id")) if config else None
        if self.bos_id is None:
            self.bos_id = self._special_id(_special_name(path, "bos_token"), BOS_NAMES)
        if self.eos_id is None:
            raise ConfigError(f"{path}: tokenizer has no end-of-sequence token")

    def _special_id(self, preferred: str | None, names: tuple[str, ...]) -> int | None:
        for name in (preferred, *names):
            if name is not None and (token_id := self._tok.token_to_id(name)) is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _read_json(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _first_id(value: int | list[int] | None) -> int | None:
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) \
        else None


def _special_name(path: Path, key: str) -> str | None:
    """The token string tokenizer_config.json gives for eos_token / bos_token, if any."""
    value = (_read_json(path / "tokenizer_config.json") or {}).get(key)
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | Path | None) -> TokenizerLike | None:
    """The model directory's tokenizer.json as an HFTokenizer, or None when there is none
    (the caller then uses ``ByteTokenizer()``)."""
    if path is None or not (Path(path) / "tokenizer.json").exists():
        return None
    return HFTokenizer(Path(path))
