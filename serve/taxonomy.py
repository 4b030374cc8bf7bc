"""Capability taxonomy as data: a YAML file of named categories with one-line descriptions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.control import has_control

DEFAULT_TAXONOMY = Path(__file__).with_name("taxonomy.yaml")


class Category(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, description="Category name, as written into labels.")
    description: str = Field(min_length=1, max_length=300, description="One line the judge reads.")


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(min_length=1, description="Changes whenever names or descriptions change.")
    categories: list[Category] = Field(min_length=2, description="The categories, in display order.")

    @model_validator(mode="after")
    def _check(self) -> Taxonomy:
        names = [c.name for c in self.categories]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"taxonomy.categories: duplicate names {dup}")
        spaced = [n for n in names if n != n.strip() or "\n" in n]
        if spaced:  # judges answer names stripped: a padded name could never be matched
            raise ValueError(
                f"taxonomy.categories: names {spaced} have leading/trailing whitespace or a newline; "
                "write them without"
            )
        bad = [n for n in names if has_control(n)]
        if bad:  # names are the structured-output choices, sent verbatim: they cannot be defanged
            raise ValueError(
                f"taxonomy.categories: names {bad} spell chat control tokens (like '<|im_start|>' or "
                "'[INST]'); rename them (descriptions may mention such tokens)"
            )
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def fingerprint(self) -> str:
        """Hash of the exact categories (part of every cache key)."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    p = Path(path) if path else DEFAULT_TAXONOMY
    if not p.exists():
        raise FileNotFoundError(f"taxonomy file {p} does not exist")
    data = yaml.safe_load(p.read_text())
    try:
        return Taxonomy.model_validate(data)
    except ValueError as e:
        raise ValueError(f"invalid taxonomy {p}: {e}") from None
