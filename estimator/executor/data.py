"""Training data: documents from text files, directories, JSONL or the embedded stdlib corpus,
tokenised, packed into fixed-length sequences and served as a deterministic, resumable stream.

Packing (nanoGPT/torchtitan style): every document's tokens are followed by the tokenizer's EOS
id and concatenated into one stream. Sequence i is the window tokens[i·T : i·T + T + 1]; its
first T tokens are the input and its last T the targets, so consecutive windows share one token.

The stream: epoch e visits every sequence once, in the order torch.randperm(num_sequences) drawn
from a generator seeded with (seed, e). Position p (sequences consumed so far) fully determines
what comes next, so a run resumes by storing p in its checkpoint.

Legend: B = batch, T = sequence length.
"""

import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from estimator.errors import ConfigError, SetupError
from estimator.executor.tokenizer import TokenizerLike as Tokenizer
from estimator.inputs import check_data_path, jsonl_object

DEFAULT_CORPUS_MAX_BYTES = 4 * 1024 * 1024
"""Cap of the embedded corpus (bytes of source text): a few MB, seconds to tokenise."""
DEFAULT_CORPUS_NAME = "stdlib"
"""What `data_source` reads when no --data was given."""
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".json", ".jsonl")
"""File suffixes read when --data is a directory (others are skipped)."""
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})


def stdlib_corpus_files(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> list[Path]:
    """The embedded default corpus: this Python's standard-library `.py` sources under
    sysconfig.get_paths()['stdlib'], sorted by relative path (test suites and site-packages
    skipped), taken in order until `max_bytes` of source is reached. Present on every machine
    with no download; deterministic for a given Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes and chosen:
            break
        chosen.append(path)
        total += size
    if not chosen:
        raise ConfigError(f"no Python sources found under {root} for the default corpus")
    return chosen


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    """One document per JSONL line (its `field`); lines must be UTF-8 JSON objects."""
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            record = jsonl_object(raw, f"{path}:{line_number}")
            if record is None:
                continue
            if not isinstance(record.get(field), str):
                raise ConfigError(f"{path}:{line_number}: no string field {field!r}")
            yield record[field]


def _file_documents(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, field)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def iter_documents(source: Path | None, *, text_field: str = "text",
                   max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> Iterator[str]:
    """Documents of a data source: a text file (one document), a JSONL file (one document per
    line, from `text_field`), a directory (every text/JSONL file below it, sorted), or None for
    the embedded stdlib corpus (capped at `max_bytes`)."""
    if source is None:
        for path in stdlib_corpus_files(max_bytes):
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    check_data_path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ConfigError(f"--data {source}: no {', '.join(TEXT_SUFFIXES)} files inside")
        for path in files:
            yield from _file_documents(path, text_field)
    else:
        yield from _file_documents(source, text_field)


def tokenize_documents(documents: Iterator[str], tokenizer: Tokenizer) -> torch.Tensor:
    """All documents' token ids, each followed by EOS, as one int32 stream (tokens)."""
    chunks = [torch.tensor([*tokenizer.encode(text), tokenizer.eos_id], dtype=torch.int32)
              for text in documents]
    if not chunks:
        raise ConfigError("the training data holds no documents")
    return torch.cat(chunks)


@dataclass(frozen=True)
class PackedDataset:
    """A token stream cut into windows of seq_len + 1 tokens (input plus shifted target)."""

    tokens: torch.Tensor
    """1-D integer token stream."""
    seq_len: int
    """Tokens per training sequence."""

    def __post_init__(self) -> None:
        if self.num_sequences < 1:
            raise SetupError(
                f"the data has {self.tokens.numel()} tokens, fewer than one sequence of "
                f"{self.seq_len} + 1; give more data or a smaller --seq-len"
            )

    @property
    def num_sequences(self) -> int:
        """Windows in one epoch (count)."""
        return (self.tokens.numel() - 1) // self.seq_len

    def sequence(self, index: int) -> torch.Tensor:
        """Window `index`: seq_len + 1 tokens."""
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The permutation of sequence indices used in `epoch`."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.num_sequences, generator=generator)

    def indices(self, seed: int, position: int, count: int) -> list[int]:
        """Sequence indices at stream positions position … position + count − 1."""
        out, orders = [], {}
        for p in range(position, position + count):
            epoch, offset = divmod(p, self.num_sequences)
            if epoch not in orders:
                orders[epoch] = self.epoch_order(seed, epoch)
            out.append(int(orders[epoch][offset]))
        return out

    def batch(self, seed: int, position: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BT, targets_BT) of the batch starting at stream `position`."""
        windows = [self.sequence(i) for i in self.indices(seed, position, batch_size)]
        window_BT1 = torch.stack(windows).long()
        return window_BT1[:, :-1], window_BT1[:, 1:]


def stream_position(step: int, micro: int, *, batch_size: int, grad_accum: int, rank: int = 0,
                    world_size: int = 1) -> int:
    """Stream position of a micro-batch (sequences consumed before it). Optimizer step `step`
    consumes batch_size · grad_accum · world_size sequences; rank r takes the r-th contiguous
    slice of grad_accum micro-batches. So world_size ranks × accumulation a read, per step,
    exactly the sequences one rank × accumulation world_size · a reads (a disjoint slice per
    rank, the same for every run with the same seed)."""
    return ((step * world_size + rank) * grad_accum + micro) * batch_size


def load_dataset(source: Path | None, tokenizer: Tokenizer, seq_len: int, *,
                 text_field: str = "text",
                 max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> PackedDataset:
    """Read, tokenise and pack a data source (see iter_documents) into a PackedDataset."""
    tokens = tokenize_documents(iter_documents(source, text_field=text_field,
                                               max_bytes=max_bytes), tokenizer)
    return PackedDataset(tokens=tokens, seq_len=seq_len)


def describe_source(source: Path | None) -> str:
    """Name of a data source for reports: its path, or 'stdlib'."""
    return DEFAULT_CORPUS_NAME if source is None else str(source)


def check_vocab(tokens: Sequence[int] | torch.Tensor, vocab_size: int) -> None:
    """Raise SetupError if a token id does not fit the model's embedding table."""
    largest = int(torch.as_tensor(tokens).max()) if len(tokens) else -1
    if largest >= vocab_size:
        raise SetupError(
            f"the tokenizer produces id {largest} but the model's vocabulary has {vocab_size} "
            "rows; use the model's own tokenizer or a model with a larger vocab_size"
        )
