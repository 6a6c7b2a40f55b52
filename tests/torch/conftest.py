"""Fixtures shared by the executor tests."""

import pytest
import torch

WORDS = ("alpha", "beta", "gamma", "delta", "train", "model", "token", "memory", "device")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small deterministic text corpus: 300 lines of 12 words from WORDS."""
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=gen))
             for _ in range(300)]
    path = tmp_path_factory.mktemp("data") / "words.txt"
    path.write_text("\n".join(lines))
    return path
