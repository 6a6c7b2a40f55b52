"""Tokenizers for the executor: a model's own ``tokenizer.json`` through the ``tokenizers``
library, or a byte-level fallback (256 byte ids + BOS + EOS) for models without one.

Both offer the same small interface: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``vocab_size`` and ``eos_id`` (``bos_id`` where there is one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from estimator.errors import ConfigError
from estimator.inputs import model_file, read_json

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

        file = model_file(path, "tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise ConfigError(f"{file}: cannot be loaded ({reason})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(path, "config.json") or {}
        self.eos_id = self._checked(config, "eos_token_id", path)
        if self.eos_id is None:
            self.eos_id = self._special_id(_special_name(path, "eos_token"), EOS_NAMES)
        self.bos_id = self._checked(config, "bos_token_id", path)
        if self.bos_id is None:
            self.bos_id = self._special_id(_special_name(path, "bos_token"), BOS_NAMES)
        if self.eos_id is None:
            raise ConfigError(f"{path}: tokenizer has no end-of-sequence token")

    def _checked(self, config: dict, key: str, path: Path) -> int | None:
        """config[key] (first of a list) as a token id of this tokenizer; ConfigError for a
        value that is not one."""
        value = config.get(key)
        token_id = _first_id(value)
        if value is not None and value != [] and token_id is None:
            raise ConfigError(f"{path / 'config.json'}: {key} {value!r} is not a token id")
        if token_id is not None and not 0 <= token_id < self.vocab_size:
            raise ConfigError(f"{path / 'config.json'}: {key} {token_id} is outside the "
                              f"tokenizer's {self.vocab_size} ids")
        return token_id

    def _special_id(self, preferred: str | None, names: tuple[str, ...]) -> int | None:
        for name in (preferred, *names):
            if name is not None and (token_id := self._tok.token_to_id(name)) is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def _read_json(path: Path, name: str) -> dict | None:
    """A model directory's JSON file; None when it is missing (ConfigError when it is
    malformed or outside the directory)."""
    try:
        return read_json(model_file(path, name))
    except FileNotFoundError:
        return None


def _first_id(value: object) -> int | None:
    """An id, or the first of a list of ids; None for anything else."""
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _special_name(path: Path, key: str) -> str | None:
    """The token string tokenizer_config.json gives for eos_token / bos_token, if any."""
    value = (_read_json(path, "tokenizer_config.json") or {}).get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path | None) -> TokenizerLike | None:
    """The model directory's tokenizer.json as an HFTokenizer, or None when there is none
    (the caller then uses ``ByteTokenizer()``)."""
    if path is None or not (Path(path) / "tokenizer.json").exists():
        return None
    return HFTokenizer(Path(path))
