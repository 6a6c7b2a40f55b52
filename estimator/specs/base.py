"""Base class for every spec: frozen, strict, field docstrings become descriptions."""

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    """Frozen pydantic model that rejects unknown fields; field docstrings document units."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
