"""params.yaml's `merge` section: the method (a name of the merge-method registry), the scale and
weights, fixed or searched on the validation split, and which deltas are merged."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dppa.pipeline.strict import Strict, check_density, check_positive


class MergeSearch(Strict):
    """`merge.scale: search`: each scale of the grid is scored on the validation split (through the evaluation
    cache), by the geometric mean over fine-tunes of their tasks' score over the dense fine-tune's."""

    grid: list[float] = Field(default=[0.3, 0.5, 0.7, 1.0], min_length=1)
    # with `merge.weights: search`: the weights tried for each fine-tune in turn (coordinate ascent)
    weight_grid: list[float] = Field(default=[0.5, 1.0, 1.5, 2.0], min_length=1)
    split: Literal["validation"] = "validation"  # the test split is kept for the final numbers
    limit: int | None = Field(default=None, ge=1)

    @field_validator("grid", "weight_grid")
    @classmethod
    def _grid(cls, value: list[float]) -> list[float]:
        if any(v <= 0 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"must be distinct values > 0, got {value}")
        return value


class Merge(Strict):
    method: str  # a registered merge method (checked by dppa/pipeline/registered.py)
    scale: float | Literal["search"]
    search: MergeSearch | None = None
    weights: dict[str, float] | Literal["search"] | None = None
    density: float | None = None
    inputs: Literal["amplified", "pruned", "deltas"] = "amplified"  # the folder under data/ (dvc.yaml)
    # deltas extracted from another base are refused unless the transfer is deliberate (merge --allow-other-base)
    allow_other_base: bool = False

    _density = field_validator("density")(check_density)

    @field_validator("scale")
    @classmethod
    def _scale(cls, value):
        return value if value == "search" else check_positive(value)

    @model_validator(mode="after")
    def _search_iff_searched(self):
        if self.scale == "search":
            if self.search is None:
                raise ValueError("`scale: search` needs a `search` section (grid, split, limit): add one")
            return self
        # a fixed scale: say everything that must go with the search, at once
        leftovers = []
        if self.search is not None:
            leftovers.append("delete `merge.search` (the scale search's settings)")
        if self.weights == "search":
            leftovers.append("set `merge.weights` to null (all 1) or to one weight per fine-tune")
        if leftovers:
            raise ValueError(f"`scale: {self.scale:g}` is fixed, so nothing is searched: {', and '.join(leftovers)}")
        return self
