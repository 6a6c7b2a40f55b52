"""The documented JSON schema of `nvfree estimate --json` is the one the code emits."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from estimator.specs import Estimate, ModelSpec, TrainSetup

SCHEMA = Path(__file__).resolve().parents[3] / "docs" / "estimate.schema.json"


def test_committed_schema_is_current() -> None:
    """Regenerate with: python -c "…Estimate.model_json_schema()…" (see docs/json.md)."""
    assert json.loads(SCHEMA.read_text()) == json.loads(
        json.dumps(Estimate.model_json_schema(), sort_keys=True))


def test_every_field_has_a_description() -> None:
    for model in (ModelSpec, TrainSetup, Estimate):
        missing = [name for name, f in model.model_fields.items() if not f.description]
        assert not missing, f"{model.__name__}: {missing}"


def test_specs_are_frozen_and_strict() -> None:
    setup = TrainSetup()
    with pytest.raises(ValidationError):
        TrainSetup(batch_sise=2)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        setup.batch_size = 3  # type: ignore[misc]
