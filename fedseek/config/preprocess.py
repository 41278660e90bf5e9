"""How a table's columns become the model's features, declared once and applied the same way at every site.

Every site of a federation (and `fedseek predict`) must turn the same raw row into the same
feature vector. What can differ between sites is therefore declared here instead of being
learnt from each site's own rows: the vocabulary of each categorical column (one-hot in that
order), the constant a missing value becomes, and the scaling statistics. The fitted result
travels with the model in its card (model.json).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedseek.config.loading import StrictSpec


class PreprocessSpec(StrictSpec):
    """Categorical vocabularies, missing-value constants and scaling of a table's feature columns.

    scaling: `local` scales each feature by the mean/std of the table it comes from (each site its
    own rows; simple, but the same raw value then means slightly different things at different
    sites), `given` uses `mean` and `std` (one value per numeric feature, shared by the whole
    federation: computed from public or agreed data), `federated` has the sites compute them
    together before round 1 (exact sums without DP; under DP a Gaussian release of sums clipped to
    `bounds`, charged to each site's ledger), `none` leaves values as they are. One-hot columns are
    never scaled. For task: regression, `given`/`federated` statistics of the label column scale
    the target too (the model card maps predictions back).
    """

    categorical: dict[str, list[str]] = Field(default_factory=dict, description="column -> vocabulary; one-hot in this order")
    fill: dict[str, float] = Field(default_factory=dict, description="column -> constant for its missing values (others: refused)")
    scaling: Literal["local", "given", "federated", "none"] = "local"
    mean: dict[str, float] = Field(default_factory=dict, description="with scaling: given, per numeric feature")
    std: dict[str, float] = Field(default_factory=dict, description="with scaling: given, per numeric feature (> 0)")
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="with scaling: federated, column -> [low, high]: each value is clipped into it for the "
        "statistics (required for every numeric column under DP: it bounds one record's influence)")

    @field_validator("categorical", mode="before")
    @classmethod
    def _vocab_as_text(cls, value: object) -> object:
        """Numbers become text as a CSV reader sees them; a YAML boolean (unquoted no/yes/on/off) is refused, not guessed."""
        if not isinstance(value, dict):
            return value
        out: dict[object, object] = {}
        for col, vocab in value.items():
            if isinstance(vocab, list):
                for v in vocab:
                    if isinstance(v, bool):
                        raise ValueError(f"categorical.{col}: {v!r} is a YAML boolean (unquoted no/yes/on/off); quote the value")
                vocab = [str(v) if isinstance(v, (int, float)) else v for v in vocab]
            out[col] = vocab
        return out

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        for col, vocab in self.categorical.items():
            if not vocab or len(set(map(str, vocab))) != len(vocab):
                raise ValueError(f"categorical.{col}: give a non-empty list of distinct values")
        both = sorted(set(self.categorical) & set(self.fill))
        if both:
            raise ValueError(f"fill applies to numeric columns; {both} are categorical (add the missing marker to the vocabulary)")
        if self.scaling == "given":
            if set(self.mean) != set(self.std) or not self.mean:
                raise ValueError("scaling: given needs mean and std for the same, non-empty set of features")
            bad = sorted(k for k, v in self.std.items() if not v > 0)
            if bad:
                raise ValueError(f"std must be > 0; not for {bad}")
        elif self.mean or self.std:
            raise ValueError("mean and std apply with scaling: given")
        if self.bounds and self.scaling != "federated":
            raise ValueError("bounds apply with scaling: federated")
        bad = sorted(k for k, (lo, hi) in self.bounds.items() if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi))
        if bad:
            raise ValueError(f"bounds must be finite [low, high] with low < high; not for {bad}")
        return self
