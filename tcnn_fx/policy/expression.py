"""The policy language: an expression becomes a tree, the tree is checked against a site table, then evaluated.

Three separate steps, so that a term's problems are found wherever it stands
(``all | name:typo`` fails as ``name:typo | all`` does) and evaluation is
plain set algebra over site names:

* ``parse(text)`` -> ``Node`` (``Term``, ``Not``, ``And``, ``Or``);
  syntax errors only.
* ``validate(node, table)``: every term against the site table (stages the
  model has, names that exist, listed sites that can be converted); all
  problems in one ``PolicyError``.
* ``matches(node, table)``: the set of site names the expression selects,
  before the policy's exclusions; ``~x`` is the complement within all sites.

Terms: ``stageN``, ``stageA+B``, ``stage>=N`` (``>``, ``<``, ``<=``, ``==``),
``last``, ``all``, ``none``, ``res<=N`` (larger output side), ``kernel>=N``
(larger kernel side), ``name:GLOB`` (shell-style glob over site names) and
``site:NAME`` (exactly that site, taken as it is: the policy's stem and 1x1
exclusions do not apply to it).  Operators ``&``, ``|``, ``~`` or ``and``,
``or``, ``not``, and parentheses.
"""

from __future__ import annotations

import difflib
import fnmatch
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.sites import Site
from tcnn_fx.stages import stage_table


class PolicyError(InvalidInputError):
    """A policy that cannot apply to the model, or does not parse; the message lists what exists."""


#: Comparison operators of the expression language (also used for attention layers' depth).
COMPARISONS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt}
_TOKEN = re.compile(r"\s*(\(|\)|&|\||~|[^\s()&|~]+)")
_WORDS = {"and": "&", "or": "|", "not": "~"}
_STAGES = re.compile(r"stage([0-9]+(?:\+[0-9]+)*)")
_COMPARISON = re.compile(r"(stage|res|kernel)(<=|>=|==|<|>)([0-9]+)")
TERMS_HELP = (
    "terms are stageN, stageA+B, stage>=N, last, all, none, res<=N, kernel>=N, name:GLOB, site:NAME, "
    "combined with & | ~ (and, or, not) and parentheses"
)


@dataclass(frozen=True)
class Term:
    text: str


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]


Node = Term | Not | And | Or


def parse(expression: str) -> Node:
    """The tree of ``expression``; a ``PolicyError`` says where the syntax is wrong or which term is unknown."""
    if not isinstance(expression, str):
        raise PolicyError(f"a policy expression is a string, not {type(expression).__name__}")
    tokens = [_WORDS.get(t, t) for t in _TOKEN.findall(expression)]
    if not tokens:
        raise PolicyError("empty policy expression; use 'none' to convert nothing")
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if position >= len(tokens):
            raise PolicyError(f"policy {expression!r} ends too early")
        position += 1
        return tokens[position - 1]

    def chain(token: str, operand, kind) -> Node:
        parts = [operand()]
        while peek() == token:
            take()
            parts.append(operand())
        return parts[0] if len(parts) == 1 else kind(tuple(parts))

    def either() -> Node:
        return chain("|", both, Or)

    def both() -> Node:
        return chain("&", negation, And)

    def negation() -> Node:
        # Iterative over repeated '~' so that a long run of them cannot exhaust the stack.
        count = 0
        while peek() == "~":
            take()
            count += 1
        token = take()
        if token == "(":
            node = either()
            if take() != ")":
                raise PolicyError(f"policy {expression!r}: missing ')'")
        elif token in (")", "&", "|"):
            raise PolicyError(f"policy {expression!r}: unexpected {token!r}")
        else:
            node = _term(token)
        return Not(node) if count % 2 else node

    try:
        node = either()
    except RecursionError:
        raise PolicyError(f"policy {expression[:40]!r}... nests parentheses too deeply") from None
    if position != len(tokens):
        raise PolicyError(f"policy {expression!r}: unexpected {tokens[position]!r}")
    return node


def _term(text: str) -> Term:
    known = (
        text in ("all", "none", "last")
        or (text.startswith(("name:", "site:")) and len(text) > 5)
        or _STAGES.fullmatch(text)
        or _COMPARISON.fullmatch(text)
    )
    if not known:
        raise PolicyError(f"unknown policy term {text!r}; {TERMS_HELP}")
    return Term(text)


def terms(node: Node) -> Iterable[Term]:
    if isinstance(node, Term):
        yield node
    elif isinstance(node, Not):
        yield from terms(node.operand)
    else:
        for operand in node.operands:
            yield from terms(operand)


def listed_sites(node: Node) -> set[str]:
    """The names of the expression's ``site:NAME`` terms."""
    return {term.text[5:] for term in terms(node) if term.text.startswith("site:")}


class SiteTable:
    """What terms are checked and evaluated against: the sites and their stages."""

    def __init__(self, sites: list[Site]):
        self.sites = list(sites)
        self.by_name = {site.name: site for site in self.sites}
        self.table = stage_table(self.sites) if self.sites else []
        self.stages = [stage.index for stage in self.table]

    def describe_stages(self) -> str:
        return ", ".join(stage.describe() for stage in self.table) or "none (the model has no convolution)"


def validate(node: Node, table: SiteTable) -> None:
    """Raise one ``PolicyError`` listing every term that does not fit ``table``, wherever it stands."""
    problems = []
    for term in dict.fromkeys(terms(node)):  # each distinct term once, in order
        problem = _problem(term.text, table)
        if problem:
            problems.append(problem)
    if problems:
        raise PolicyError("; ".join(problems))


def _problem(text: str, table: SiteTable) -> str | None:
    names = list(table.by_name)
    if text.startswith("name:"):
        pattern = text[5:]
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return unknown_name(pattern, names)
    elif text.startswith("site:"):
        site = table.by_name.get(text[5:])
        if site is None:
            return unknown_name(text[5:], names)
        if not site.convertible:
            return f"site '{site.name}' is listed but cannot be converted: {site.reason}"
    elif match := _STAGES.fullmatch(text):
        missing = {int(n) for n in match.group(1).split("+")} - set(table.stages)
        if missing:
            return f"'{text}': the model has no stage {sorted(missing)}; its stages are {table.describe_stages()}"
    elif text == "last" and not table.stages:
        return "'last': the model has no convolution stage"
    return None


def unknown_name(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5)
    hint = f"; did you mean {close}?" if close else f"; sites are {known[:20]}{' ...' if len(known) > 20 else ''}"
    return f"no site named '{name}'{hint}"


def matches(node: Node, table: SiteTable) -> set[str]:
    """The names of the sites ``node`` selects (``validate`` first); ``~`` complements within all sites."""
    if isinstance(node, Term):
        return {site.name for site in table.sites if _holds(node.text, site, table)}
    if isinstance(node, Not):
        return set(table.by_name) - matches(node.operand, table)
    sets = [matches(operand, table) for operand in node.operands]
    return set.intersection(*sets) if isinstance(node, And) else set.union(*sets)


def _holds(text: str, site: Site, table: SiteTable) -> bool:
    if text in ("all", "none"):
        return text == "all"
    if text == "last":
        return site.stage == table.stages[-1]
    if text.startswith("name:"):
        return fnmatch.fnmatchcase(site.name, text[5:])
    if text.startswith("site:"):
        return site.name == text[5:]
    if match := _STAGES.fullmatch(text):
        return site.stage in {int(n) for n in match.group(1).split("+")}
    key, op, value = _COMPARISON.fullmatch(text).groups()
    measure = {"stage": site.stage, "res": site.resolution, "kernel": max(site.kernel_size)}[key]
    return COMPARISONS[op](measure, int(value))


def to_text(node: Node) -> str:
    """The expression of a tree, fully parenthesised: ``parse(to_text(node)) == node``."""
    if isinstance(node, Term):
        return node.text
    if isinstance(node, Not):
        return f"~{_operand_text(node.operand)}"
    joiner = " & " if isinstance(node, And) else " | "
    return joiner.join(_operand_text(operand) for operand in node.operands)


def _operand_text(node: Node) -> str:
    return node.text if isinstance(node, Term) else f"({to_text(node)})"
