"""Settings objects that serialise: a frozen dataclass to and from a plain dict (JSON, checkpoints)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tcnn_fx.errors import InvalidInputError

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations are strings here, so 3.10 never imports it


class DictSettings:
    """``to_dict`` / ``from_dict`` for a dataclass; a dict with fields the class lacks is refused by name."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**data)
