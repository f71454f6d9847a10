"""Dataset plugins (entry-point group ``iwmf_bench.datasets``) and how to open one."""

from __future__ import annotations

from typing import Any

from .. import registry
from .base import Dataset, DatasetError, Pair, sample_pairs

__all__ = ["Dataset", "DatasetError", "Pair", "sample_pairs", "open_dataset"]


def open_dataset(name: str, **options: Any) -> Dataset:
    """Build the registered dataset ``name``; unknown options fail naming the accepted ones."""
    entry = registry.get("datasets", name)
    unknown, accepted = registry.unknown_options(entry.factory, sorted(options))
    if unknown:
        raise DatasetError(f"dataset {name}: unknown option(s) {', '.join(unknown)} "
                           f"(accepted: {', '.join(accepted or ())})")
    try:
        return entry.factory(**options)
    except TypeError as exc:  # a required option is missing
        raise DatasetError(f"dataset {name}: {exc}") from None
