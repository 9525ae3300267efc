"""The data room's configuration (``data:`` in a heft config)."""

from __future__ import annotations

from dataclasses import dataclass


class DataConfigError(ValueError):
    """The data config does not match the prepared dataset, or the dataset is broken."""


@dataclass
class DataConfig:
    """Where the training tokens come from (the output of ``heft prepare``)."""

    path: str = "demo_data"
    """Directory written by ``heft prepare``: one MDS dataset per domain and manifest.json."""
    proportions: dict[str, float] | None = None
    """Static domain mixture, e.g. {code: 0.5, docs: 0.5}; normalised. None: by token count."""
    shuffle_seed: int = 1234
    num_canonical_nodes: int | None = None
    """mosaicml-streaming's canonical node count; fixed values keep sample order layout-invariant."""

    def check(self) -> None:
        if self.proportions is not None:
            if not self.proportions or any(v < 0 for v in self.proportions.values()):
                raise ValueError("data.proportions must map domain names to non-negative weights")
            if sum(self.proportions.values()) <= 0:
                raise ValueError("data.proportions must have a positive total")
        if self.num_canonical_nodes is not None and self.num_canonical_nodes < 1:
            raise ValueError(f"data.num_canonical_nodes must be >= 1, got {self.num_canonical_nodes}")
