"""Policies: which sites become attention.

A policy is a selection expression over sites (``tcnn_fx.policy.expression``),
default exclusions, an optional exact site list (what a search produces) and
optional cost budgets.  It serialises to a dict (JSON or YAML file) and back,
so a choice can be replayed.

Planning is parse -> validate -> evaluate: every term is checked against the
site table before anything is selected, whatever its position.

By default the stem and 1x1 convolutions are excluded (the paper converts the
3x3 convolutions of the late stages); ``include_stem`` and
``include_pointwise`` lift that.  Sites listed in ``sites`` (or as
``site:NAME`` terms) are taken as they are.  ``~`` complements within the
sites the policy may convert (the convertible sites its exclusions leave,
and its listed sites), so ``p | ~p`` converts all of them and ``p & ~p``
none.

Budgets (``max_flop_ratio``, ``max_param_ratio``) cap the plan's ratios,
hybrid / CNN over the whole model (``tcnn_fx.cost``): candidates are taken
from the last stage backwards while the budget holds.  A budget belongs to
the plan, not to a term: composed with ``&``, ``|`` or ``~``, every budget
of every operand still holds for the result (the tightest wins).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import fx

from tcnn_fx import meta
from tcnn_fx.cost import ModelCost
from tcnn_fx.errors import MissingFileError
from tcnn_fx.files import atomic_write
from tcnn_fx.policy.expression import (
    COMPARISONS,
    Node,
    Or,
    PolicyError,
    SiteTable,
    Term,
    listed_sites,
    matches,
    parse,
    to_text,
    validate,
)
from tcnn_fx.sites import Site

__all__ = ["COMPARISONS", "Plan", "Policy", "PolicyError"]

_SPECIAL = re.compile(r"[\s()&|~]")


@dataclass(frozen=True)
class Plan:
    """The outcome of a policy on a site table: the sites to convert and why the others are not."""

    selected: tuple[Site, ...]
    skipped: dict[str, str]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(site.name for site in self.selected)


@dataclass(frozen=True)
class Policy:
    """Which sites to convert; see the module docstring."""

    select: str = "stage4"
    sites: tuple[str, ...] = ()
    include_stem: bool = False
    include_pointwise: bool = False
    max_flop_ratio: float | None = None
    max_param_ratio: float | None = None
    where: Callable[[Site], bool] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.sites, str) or not all(isinstance(n, str) for n in self.sites):
            raise PolicyError(f"sites must be a list of site names, not {self.sites!r}")
        object.__setattr__(self, "sites", tuple(self.sites))
        for name in ("include_stem", "include_pointwise"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"{name} must be true or false, not {getattr(self, name)!r}")
        for name in ("max_flop_ratio", "max_param_ratio"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise PolicyError(f"{name} must be a number such as 1.2, not {value!r}")
            if value < 1.0:
                raise PolicyError(f"{name}={value} is impossible: attention never costs less than the convolution")
        if self.where is not None and not callable(self.where):
            raise PolicyError(f"where must be a function of a Site, not {type(self.where).__name__}")
        parse(self.select)  # fail early on syntax

    @property
    def tree(self) -> Node:
        """The expression as a tree, listed sites included as ``site:NAME`` terms."""
        node = parse(self.select)
        return Or((node, *(Term(f"site:{name}") for name in self.sites))) if self.sites else node

    # Construction and composition

    @classmethod
    def coerce(cls, policy: Policy | str | Iterable[str] | Callable[[Site], bool] | dict) -> Policy:
        """A ``Policy`` from what users pass: a policy, an expression, site names, a predicate or a dict."""
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, str):
            return cls(select=policy)
        if isinstance(policy, dict):
            return cls.from_dict(policy)
        if callable(policy):
            return cls(select="all", where=policy)
        try:
            names = tuple(policy)
        except TypeError:
            raise PolicyError(
                f"a policy is an expression, a list of site names, a dict or a Policy, not {type(policy).__name__}"
            ) from None
        return cls(select="none", sites=names)

    def __and__(self, other: Policy | str) -> Policy:
        return self._combine(other, "&")

    def __or__(self, other: Policy | str) -> Policy:
        return self._combine(other, "|")

    def __invert__(self) -> Policy:
        return self._composed(f"~({self._text()})", self)

    def _combine(self, other: Policy | str, op: str) -> Policy:
        other = Policy.coerce(other)
        if (self.include_stem, self.include_pointwise) != (other.include_stem, other.include_pointwise):
            raise PolicyError(
                "policies with different include_stem/include_pointwise cannot be combined: each operand's "
                "exclusions would change the other's meaning; give both the same settings"
            )
        return self._composed(f"({self._text()}) {op} ({other._text()})", self, other)

    def _text(self) -> str:
        if self.where is not None:
            raise PolicyError("a policy with a Python predicate (where=...) does not combine; combine in Python")
        odd = [name for name in self.sites if _SPECIAL.search(name)]
        if odd:
            raise PolicyError(f"sites {odd} have spaces or operator characters in their names and cannot be combined")
        return to_text(self.tree)

    @staticmethod
    def _composed(select: str, *operands: Policy) -> Policy:
        def tightest(name: str) -> float | None:
            values = [getattr(p, name) for p in operands if getattr(p, name) is not None]
            return min(values) if values else None

        first = operands[0]
        return Policy(
            select=select, include_stem=first.include_stem, include_pointwise=first.include_pointwise,
            max_flop_ratio=tightest("max_flop_ratio"), max_param_ratio=tightest("max_param_ratio"),
        )  # fmt: skip

    # Serialisation

    def to_dict(self) -> dict:
        if self.where is not None:
            raise PolicyError("a policy with a Python predicate (where=...) cannot be saved; list its sites instead")
        data = dataclasses.asdict(self)
        data.pop("where")
        data["sites"] = list(self.sites)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"a policy file holds a mapping of fields, not a {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"where"}
        unknown = set(data) - fields
        if unknown:
            raise PolicyError(f"unknown policy fields {sorted(map(str, unknown))}; known: {sorted(fields)}")
        data = dict(data)
        if isinstance(data.get("sites"), list):
            data["sites"] = tuple(data["sites"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the policy as JSON (``.json``) or YAML (``.yaml``/``.yml``), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        with atomic_write(path) as temporary:
            Path(temporary).write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"policy file {path} does not exist")
        try:
            text = path.read_text()
            data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
            raise PolicyError(f"policy file {path} cannot be read: {' '.join(str(error).split())}") from error
        try:
            return cls.from_dict(data)
        except PolicyError as error:
            raise PolicyError(f"policy file {path}: {error}") from error

    # Application

    def plan(self, sites: list[Site] | fx.GraphModule, cost: ModelCost | None = None) -> Plan:
        """Choose sites to convert from ``sites`` (or from a graph ``tcnn_fx.trace`` returned, with its cost).

        ``cost`` (the model's ``ModelCost``) is needed for budgets.  Raises
        ``PolicyError`` for terms or names that do not fit the model.
        """
        if isinstance(sites, fx.GraphModule):
            sites, cost = meta.sites(sites), meta.model_cost(sites)
        table = SiteTable(sites)
        tree = self.tree
        validate(tree, table)
        selected = matches(tree, table)
        allowed = self._allowed(table) | listed_sites(tree)
        skipped: dict[str, str] = {}
        for name in selected - allowed:
            skipped[name] = self._exclusion(table.by_name[name])
        chosen = [site for site in table.sites if site.name in selected & allowed]
        if self.where is not None:
            chosen = [site for site in chosen if self.where(site)]
        chosen = self._within_budget(table.sites, chosen, cost, skipped)
        if not chosen and (self.select != "none" or self.sites):  # "none" asks for nothing (the CNN as is)
            warnings.warn(f"policy {self.select!r} selects no convertible site", stacklevel=2)
        order = {name: i for i, name in enumerate(table.by_name)}
        return Plan(tuple(chosen), dict(sorted(skipped.items(), key=lambda item: order[item[0]])))

    def _allowed(self, table: SiteTable) -> set[str]:
        """The sites the expression may select: convertible, and not excluded as stem or 1x1."""
        return {
            site.name
            for site in table.sites
            if site.convertible
            and (self.include_stem or not site.stem)
            and (self.include_pointwise or max(site.kernel_size) > 1)
        }

    def _exclusion(self, site: Site) -> str:
        if not site.convertible:
            return site.reason
        if site.stem and not self.include_stem:
            return "stem (include_stem=True converts it)"
        return "1x1 convolution (include_pointwise=True converts it)"

    def _within_budget(
        self, sites: list[Site], chosen: list[Site], cost: ModelCost | None, skipped: dict[str, str]
    ) -> list[Site]:
        if self.max_flop_ratio is None and self.max_param_ratio is None:
            return chosen
        if cost is None:
            raise PolicyError(
                "budgets are whole-model ratios: plan(sites, cost) needs the model's cost "
                "(tcnn_fx.meta.model_cost(graph)), or pass the graph tcnn_fx.trace returned: plan(graph)"
            )
        taken: list[Site] = []
        hybrid = cost  # of the sites taken so far
        for site in sorted(chosen, key=lambda s: (-s.stage, sites.index(s))):
            trial = hybrid.hybrid([site])
            if self.max_flop_ratio is not None and trial.flops > self.max_flop_ratio * cost.flops:
                skipped[site.name] = f"over the FLOP budget (ratio {self.max_flop_ratio})"
            elif self.max_param_ratio is not None and trial.params > self.max_param_ratio * cost.params:
                skipped[site.name] = f"over the parameter budget (ratio {self.max_param_ratio})"
            else:
                taken.append(site)
                hybrid = trial
        return sorted(taken, key=sites.index)
