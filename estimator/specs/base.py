"""Base class for every spec: frozen, strict, field docstrings become descriptions."""

from pydantic import BaseModel, ConfigDict


class Spec(BaseModel):
    """Frozen pydantic model that rejects unknown fields and non-finite numbers (no spec holds a
    NaN or an infinity: issue 21); field docstrings document units."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True,
                              allow_inf_nan=False)
