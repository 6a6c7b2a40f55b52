"""Data pipeline: sources, packing with EOS, the deterministic resumable stream."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from estimator.errors import ConfigError, SetupError
from estimator.executor.data import (
    PackedDataset,
    check_vocab,
    iter_documents,
    load_dataset,
    stdlib_corpus_files,
    tokenize_documents,
)
from estimator.executor.tokenizer import ByteTokenizer

pytestmark = pytest.mark.torch


def test_stdlib_corpus_is_sorted_capped_and_skips_tests():
    files = stdlib_corpus_files(max_bytes=512 * 1024)
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [f.relative_to(root) for f in files]
    assert relative == sorted(relative)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(r.parts[:-1]) for r in relative)
    total = sum(f.stat().st_size for f in files)
    assert 256 * 1024 < total <= 512 * 1024
    assert files == stdlib_corpus_files(max_bytes=512 * 1024)


def test_default_corpus_tokenises_to_megabytes_of_tokens():
    dataset = load_dataset(None, ByteTokenizer(), seq_len=128, max_bytes=1024 * 1024)
    assert dataset.tokens.numel() > 900_000
    assert dataset.num_sequences == (dataset.tokens.numel() - 1) // 128


def test_text_file_directory_and_jsonl_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2"}) + "\n")
    assert list(iter_documents(tmp_path / "b.txt")) == ["second"]
    assert list(iter_documents(tmp_path)) == ["first", "second", "j1", "j2"]
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"body": "x", "text": 3}) + "\n")
    assert list(iter_documents(custom, text_field="body")) == ["x"]


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json\n", "not valid JSON"),
    ('{"other": "x"}\n', "no string field 'text'"),
], ids=["malformed", "missing-field"])
def test_bad_jsonl_names_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n' + content)
    with pytest.raises(ConfigError, match=rf"bad.jsonl:2: {expected}"):
        list(iter_documents(path))


def test_missing_path_and_empty_directory_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        list(iter_documents(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="files inside"):
        list(iter_documents(tmp_path))


def test_eos_separates_documents_and_targets_are_shifted_inputs():
    tok = ByteTokenizer()
    tokens = tokenize_documents(iter(["ab", "cd"]), tok)
    assert tokens.tolist() == [97, 98, tok.eos_id, 99, 100, tok.eos_id]
    dataset = PackedDataset(tokens=tokens, seq_len=2)
    assert dataset.num_sequences == 2
    assert dataset.sequence(1).tolist() == [tok.eos_id, 99, 100]
    inputs, targets = dataset.batch(seed=0, position=0, batch_size=2)
    assert inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def _dataset(num_tokens: int = 1001, seq_len: int = 10) -> PackedDataset:
    return PackedDataset(tokens=torch.arange(num_tokens, dtype=torch.int32), seq_len=seq_len)


def test_each_epoch_visits_every_sequence_once_in_a_seeded_order():
    dataset = _dataset()
    n = dataset.num_sequences
    epoch0 = dataset.indices(seed=3, position=0, count=n)
    epoch1 = dataset.indices(seed=3, position=n, count=n)
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch0 != dataset.indices(seed=4, position=0, count=n)
    assert epoch0 == dataset.indices(seed=3, position=0, count=n)


def test_stream_resumes_by_position():
    dataset = _dataset()
    straight = [dataset.batch(7, p, 4)[0] for p in range(0, 200, 4)]
    resumed = [dataset.batch(7, p, 4)[0] for p in range(100, 200, 4)]
    assert all(torch.equal(a, b) for a, b in zip(straight[25:], resumed, strict=True))


def test_too_little_data_for_one_sequence_is_a_setup_error():
    with pytest.raises(SetupError, match="fewer than one sequence"):
        _dataset(num_tokens=10, seq_len=10)


def test_token_ids_beyond_the_vocabulary_are_rejected():
    check_vocab(torch.tensor([0, 257]), 258)
    with pytest.raises(SetupError, match="id 300"):
        check_vocab(torch.tensor([1, 300]), 258)
