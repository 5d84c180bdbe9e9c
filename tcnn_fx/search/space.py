"""The search space: which convertible sites to recast, one binary choice per site, block or stage.

A point of the space is a mask over its groups; its policy converts exactly
the sites of the groups set, and replays with ``rewrite(policy=...)``.  The
FLOP and parameter ratios of a point come from the cost model
(``tcnn_fx.cost``, whole model, as ``RewriteReport`` and policy budgets), so
costs need no rewrite.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

from torch import nn

from tcnn_fx import meta
from tcnn_fx.cost import ModelCost
from tcnn_fx.errors import InvalidInputError
from tcnn_fx.policy import Policy
from tcnn_fx.rewrite import trace
from tcnn_fx.sites import Site

GROUPINGS = ("site", "block", "stage")


@dataclass(frozen=True)
class Group:
    """One binary choice: these sites are converted together or not at all."""

    label: str
    sites: tuple[str, ...]


@dataclass(frozen=True)
class SearchSpace:
    """Groups of convertible sites chosen by a base policy, with the model's totals for exact cost ratios."""

    groups: tuple[Group, ...]
    sites: dict[str, Site]
    cost: ModelCost
    base_policy: str
    grouping: str

    @classmethod
    def build(
        cls, model: nn.Module, example_inputs: tuple, base_policy: str = "all", grouping: str = "site"
    ) -> SearchSpace:
        """The space of ``model``: the sites ``base_policy`` would convert, grouped by site, block or stage."""
        if grouping not in GROUPINGS:
            raise InvalidInputError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
        graph_module = trace(model, example_inputs)
        sites, cost = meta.sites(graph_module), meta.model_cost(graph_module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an empty selection is reported below, as an error
            chosen = set(Policy(base_policy).plan(sites, cost).names)
        if not chosen:
            raise InvalidInputError(
                f"the search space is empty: base policy {base_policy!r} selects no convertible site "
                f"(convertible: {[s.name for s in sites if s.convertible][:12]})"
            )
        keyed: dict[str, list[str]] = {}
        for site in (s for s in sites if s.name in chosen):
            label = {"site": site.name, "block": f"block {site.block}", "stage": f"stage {site.stage}"}[grouping]
            keyed.setdefault(label, []).append(site.name)
        groups = tuple(Group(label, tuple(names)) for label, names in keyed.items())
        return cls(groups, {s.name: s for s in sites if s.name in chosen}, cost, base_policy, grouping)

    @property
    def size(self) -> int:
        return 2 ** len(self.groups)

    @property
    def signature(self) -> str:
        """What a stored study must match: the groups and their sites."""
        return hashlib.sha256(repr([(g.label, g.sites) for g in self.groups]).encode()).hexdigest()[:16]

    def names(self, mask: tuple[bool, ...]) -> tuple[str, ...]:
        self._check(mask)
        return tuple(name for group, on in zip(self.groups, mask, strict=True) if on for name in group.sites)

    def policy(self, mask: tuple[bool, ...]) -> Policy:
        """The policy converting exactly the sites of ``mask`` (a site list: it replays on the same model)."""
        return Policy(select="none", sites=self.names(mask))

    def mask_of(self, names: set[str] | tuple[str, ...]) -> tuple[bool, ...]:
        """The mask converting ``names``; each group must be wholly in or out."""
        names = set(names)
        mask = []
        for group in self.groups:
            inside = [n in names for n in group.sites]
            if any(inside) and not all(inside):
                raise InvalidInputError(
                    f"{group.label} is converted in part ({group.sites}); the space converts groups whole"
                )
            mask.append(all(inside))
        return tuple(mask)

    def flop_ratio(self, mask: tuple[bool, ...]) -> float:
        return self.cost.flop_ratio(self.sites[n] for n in self.names(mask))

    def param_ratio(self, mask: tuple[bool, ...]) -> float:
        return self.cost.param_ratio(self.sites[n] for n in self.names(mask))

    def _check(self, mask: tuple[bool, ...]) -> None:
        if len(mask) != len(self.groups):
            raise InvalidInputError(f"a mask of this space has {len(self.groups)} entries, not {len(mask)}")
