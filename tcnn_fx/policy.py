"""Policies: which sites become attention.

A policy is a selection expression over sites, default exclusions, an
optional exact site list (what a search produces) and optional cost budgets.
It serialises to a dict (JSON or YAML file) and back, so a choice can be
replayed.

Expression terms (combine with ``&``, ``|``, ``~`` or ``and``, ``or``,
``not``, and parentheses):

* ``stage4``, ``stage3+4``, ``stage>=3`` (also ``>``, ``<``, ``<=``, ``==``)
* ``last`` (the last stage, whatever its number), ``all``, ``none``
* ``res<=14`` (the larger output side), ``kernel>=3`` (the larger kernel side)
* ``name:layer4.*`` (qualified site names, shell-style globs)

By default the stem and 1x1 convolutions are excluded (the paper converts the
3x3 convolutions of the late stages); ``include_stem`` and
``include_pointwise`` lift that.  Sites listed in ``sites`` are taken as they
are.  Budgets cap the whole model's FLOP or parameter ratio (hybrid / CNN):
candidates are taken from the last stage backwards while the budget holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import operator
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tcnn_fx.errors import InvalidInputError, UsageError
from tcnn_fx.sites import Site
from tcnn_fx.stages import stage_table

#: Comparison operators of the expression language (also used for attention layers' depth).
COMPARISONS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}
_TOKEN = re.compile(r"\s*(\(|\)|&|\||~|[^\s()&|~]+)")


class PolicyError(InvalidInputError):
    """A policy that cannot apply to the model; the message lists what exists."""


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
    """Which sites to convert; see the module docstring for the expression language."""

    select: str = "stage4"
    sites: tuple[str, ...] = ()
    include_stem: bool = False
    include_pointwise: bool = False
    max_flop_ratio: float | None = None
    max_param_ratio: float | None = None
    where: Callable[[Site], bool] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        _parse(self.select)  # fail early on syntax
        for name in ("max_flop_ratio", "max_param_ratio"):
            value = getattr(self, name)
            if value is not None and value < 1.0:
                raise PolicyError(f"{name}={value} is impossible: attention never costs less than the convolution")

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
        names = tuple(policy)
        if not all(isinstance(n, str) for n in names):
            raise UsageError(f"a policy list must hold site names, got {names!r}")
        return cls(select="none", sites=names)

    def __and__(self, other: Policy | str) -> Policy:
        return self._combine(other, "&")

    def __or__(self, other: Policy | str) -> Policy:
        return self._combine(other, "|")

    def __invert__(self) -> Policy:
        return dataclasses.replace(self, select=f"~({self.select})")

    def _combine(self, other: Policy | str, op: str) -> Policy:
        other = Policy.coerce(other)
        if other.sites or other.where is not None or self.where is not None:
            raise PolicyError("only expression policies combine with & and |; combine predicates in Python")
        return dataclasses.replace(self, select=f"({self.select}) {op} ({other.select})")

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
        fields = {f.name for f in dataclasses.fields(cls)} - {"where"}
        unknown = set(data) - fields
        if unknown:
            raise PolicyError(f"unknown policy fields {sorted(unknown)}; known: {sorted(fields)}")
        data = dict(data)
        data["sites"] = tuple(data.get("sites", ()))
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write the policy as JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(path.read_text()))
        return cls.from_dict(json.loads(path.read_text()))

    # Application

    def plan(self, sites: list[Site]) -> Plan:
        """Choose sites to convert; raises ``PolicyError`` for terms or names that do not fit the model."""
        by_name = {site.name: site for site in sites}
        skipped: dict[str, str] = {}
        chosen: dict[str, Site] = {}
        for name in self.sites:
            site = by_name.get(name)
            if site is None:
                raise PolicyError(_unknown_name(name, by_name))
            if not site.convertible:
                raise PolicyError(f"site '{name}' is listed but cannot be converted: {site.reason}")
            chosen[name] = site
        predicate = _parse(self.select)
        context = _Context(sites)
        for site in sites:
            if site.name in chosen or not predicate(site, context):
                continue
            if self.where is not None and not self.where(site):
                continue
            if not site.convertible:
                skipped[site.name] = site.reason
            elif site.stem and not self.include_stem:
                skipped[site.name] = "stem (include_stem=True converts it)"
            elif max(site.kernel_size) == 1 and not self.include_pointwise:
                skipped[site.name] = "1x1 convolution (include_pointwise=True converts it)"
            else:
                chosen[site.name] = site
        selected = self._within_budget(sites, chosen, skipped)
        if not selected and (self.select != "none" or self.sites):  # "none" asks for nothing (the CNN as is)
            warnings.warn(f"policy {self.select!r} selects no convertible site", stacklevel=2)
        return Plan(tuple(selected), skipped)

    def _within_budget(self, sites: list[Site], chosen: dict[str, Site], skipped: dict[str, str]) -> list[Site]:
        order = sorted(chosen.values(), key=lambda s: (-s.stage, sites.index(s)))
        flops = sum(s.conv_flops for s in sites)
        params = sum(s.conv_params for s in sites)
        taken = []
        budget_flops, budget_params = flops, params
        for site in order:
            new_flops = budget_flops + site.attention_flops - site.conv_flops
            new_params = budget_params + site.attention_params - site.conv_params
            if self.max_flop_ratio is not None and new_flops > self.max_flop_ratio * flops:
                skipped[site.name] = f"over the FLOP budget (ratio {self.max_flop_ratio})"
            elif self.max_param_ratio is not None and new_params > self.max_param_ratio * params:
                skipped[site.name] = f"over the parameter budget (ratio {self.max_param_ratio})"
            else:
                taken.append(site)
                budget_flops, budget_params = new_flops, new_params
        return sorted(taken, key=sites.index)


class _Context:
    """What terms need to know about the whole site table."""

    def __init__(self, sites: list[Site]):
        self.table = stage_table(sites)
        self.stages = [stage.index for stage in self.table]
        self.names = [s.name for s in sites]

    def describe_stages(self) -> str:
        return ", ".join(stage.describe() for stage in self.table)


def _unknown_name(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; did you mean {close}?" if close else f"; sites are {known[:20]}{' ...' if len(known) > 20 else ''}"
    return f"no site named '{name}'{hint}"


Predicate = Callable[[Site, _Context], bool]


def _term(text: str) -> Predicate:
    if text in ("all", "none"):
        return lambda site, ctx: text == "all"
    if text == "last":
        return lambda site, ctx: site.stage == ctx.stages[-1]
    if text.startswith("name:"):
        pattern = text[5:]

        def by_name(site: Site, ctx: _Context) -> bool:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in ctx.names):
                raise PolicyError(_unknown_name(pattern, ctx.names))
            return fnmatch.fnmatchcase(site.name, pattern)

        return by_name
    match = re.fullmatch(r"stage(\d+(?:\+\d+)*)", text)
    if match:
        wanted = {int(n) for n in match.group(1).split("+")}

        def by_stage(site: Site, ctx: _Context) -> bool:
            missing = wanted - set(ctx.stages)
            if missing:
                raise PolicyError(
                    f"'{text}': the model has no stage {sorted(missing)}; its stages are {ctx.describe_stages()}"
                )
            return site.stage in wanted

        return by_stage
    match = re.fullmatch(r"(stage|res|kernel)(<=|>=|==|<|>)(\d+)", text)
    if match:
        key, op, value = match.group(1), COMPARISONS[match.group(2)], int(match.group(3))
        measure = {"stage": lambda s: s.stage, "res": lambda s: s.resolution, "kernel": lambda s: max(s.kernel_size)}
        return lambda site, ctx: op(measure[key](site), value)
    raise PolicyError(
        f"unknown policy term {text!r}; terms are stageN, stageA+B, stage>=N, last, all, none, res<=N, kernel>=N, "
        "name:GLOB, combined with & | ~ and parentheses"
    )


def _parse(expression: str) -> Predicate:
    """Parse a selection expression into a predicate over (site, context)."""
    words = {"and": "&", "or": "|", "not": "~"}
    tokens = [words.get(t, t) for t in _TOKEN.findall(expression)]
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if position >= len(tokens):
            raise PolicyError(f"policy {expression!r} ends too early")
        position += 1
        return tokens[position - 1]

    def chain(token: str, operand: Callable[[], Predicate], combine: Callable) -> Predicate:
        parts = [operand()]
        while peek() == token:
            take()
            parts.append(operand())
        return parts[0] if len(parts) == 1 else (lambda s, c: combine(p(s, c) for p in parts))

    def either() -> Predicate:
        return chain("|", both, any)

    def both() -> Predicate:
        return chain("&", negation, all)

    def negation() -> Predicate:
        if peek() == "~":
            take()
            inner = negation()
            return lambda s, c: not inner(s, c)
        token = take()
        if token == "(":
            inner = either()
            if take() != ")":
                raise PolicyError(f"policy {expression!r}: missing ')'")
            return inner
        if token in (")", "&", "|"):
            raise PolicyError(f"policy {expression!r}: unexpected {token!r}")
        return _term(token)

    if not tokens:
        raise PolicyError("empty policy expression; use 'none' to convert nothing")
    predicate = either()
    if position != len(tokens):
        raise PolicyError(f"policy {expression!r}: unexpected {tokens[position]!r}")
    return predicate
