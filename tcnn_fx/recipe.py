"""What a rewrite was asked to do (``RewriteRecipe``) and what it did (``RewriteReport``), kept apart.

The recipe is everything needed to replay a rewrite on a freshly built base
model and reach the same graph: the model spec, the submodule, the policy,
the layer config, the capture options, whether norms were folded, the input
shapes, and the structural passes applied before it (a new head, a ViT's
convolutional stem).  It is plain data: JSON in a checkpoint, metadata in
an ONNX file.  ``verify``, ``save``/``load`` and export read it, so each of
them sees the graph ``rewrite`` saw.  The report holds the results: which
sites were converted, which skipped and why, and the costs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.settings import DictSettings

#: Version of the recipe's fields; a recipe from a later version is refused by name.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class RewriteRecipe(DictSettings):
    """How to replay a rewrite; see the module docstring.

    ``leaf_names`` and ``leaf_types`` are the capture's ``leaf_modules``:
    qualified module names, and classes as ``module.QualifiedName`` (matched
    against the classes of the rebuilt model's own modules on replay, never
    imported).  ``spec_sha256`` is the SHA-256 of the Python file a
    ``path/to/file.py:factory`` spec names, taken when the rewrite ran.
    """

    spec: str | None = None
    spec_sha256: str | None = None
    module: str | None = None
    policy: dict | None = None
    config: dict = field(default_factory=dict)
    leaf_names: tuple[str, ...] = ()
    leaf_types: tuple[str, ...] = ()
    fold_norm: bool = False
    input_shapes: tuple[tuple[int, ...], ...] = ()
    input_dtype: str = "float32"
    num_classes: int | None = None
    conv_stem: dict | None = None
    version: int = RECIPE_VERSION

    @classmethod
    def from_dict(cls, data: dict) -> RewriteRecipe:
        if not isinstance(data, dict):
            raise InvalidInputError(f"a rewrite recipe is a dict of fields, not a {type(data).__name__}")
        if data.get("version", RECIPE_VERSION) > RECIPE_VERSION:
            raise InvalidInputError(
                f"the recipe is version {data['version']}; this tcnn_fx reads up to {RECIPE_VERSION}: upgrade tcnn_fx"
            )
        data = dict(data)
        for name in ("leaf_names", "leaf_types"):
            data[name] = tuple(data.get(name, ()))
        data["input_shapes"] = tuple(tuple(int(n) for n in shape) for shape in data.get("input_shapes", ()))
        try:
            return super().from_dict(data)
        except TypeError as error:
            raise InvalidInputError(f"not a rewrite recipe: {error}") from error

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The first input's shape (the image batch of a CNN)."""
        return self.input_shapes[0]

    def leaf_modules(self, model: nn.Module) -> list[str | type]:
        """The ``leaf_modules`` to capture ``model`` (the rebuilt base model) with, types found among its modules."""
        classes = {type_name(type(m)): type(m) for m in model.modules()}
        missing = [name for name in self.leaf_types if name not in classes]
        if missing:
            raise InvalidInputError(
                f"the recipe keeps modules of types {missing} whole, but the model has no module of such a type"
            )
        return [*self.leaf_names, *(classes[name] for name in self.leaf_types)]

    def replace(self, **changes) -> RewriteRecipe:
        return dataclasses.replace(self, **changes)


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def split_leaf_modules(leaf_modules: Iterable[type | str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``leaf_modules`` as the recipe records them: (qualified names, type names)."""
    names, types = [], []
    for leaf in leaf_modules:
        if isinstance(leaf, str):
            names.append(leaf)
        elif isinstance(leaf, type):
            types.append(type_name(leaf))
        else:
            raise InvalidInputError(f"leaf_modules holds {leaf!r}; give module classes or qualified module names")
    return tuple(names), tuple(types)


@dataclass(frozen=True)
class RewriteReport:
    """What ``rewrite`` did: converted sites, skipped sites with reasons, and costs (``tcnn_fx.cost``).

    ``flops`` and ``hybrid_flops`` are per image over the whole model;
    ``params`` and ``hybrid_params`` count every parameter (a folded norm's
    affine parameters leave the hybrid's count).  ``recipe`` is how to
    replay the rewrite.
    """

    converted: tuple[str, ...]
    skipped: dict[str, str]
    flops: int
    hybrid_flops: int
    params: int
    hybrid_params: int
    recipe: RewriteRecipe
    folded_norms: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    capture: dict = field(default_factory=dict)

    @property
    def flop_ratio(self) -> float:
        return self.hybrid_flops / self.flops

    @property
    def param_ratio(self) -> float:
        return self.hybrid_params / self.params

    def summary(self) -> str:
        return (
            f"converted {len(self.converted)} sites, skipped {len(self.skipped)}; "
            f"FLOP ratio {self.flop_ratio:.3f}, parameter ratio {self.param_ratio:.3f} (whole model, hybrid / CNN)"
        )
