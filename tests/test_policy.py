"""Policy engine: names, rules, lists, predicates, composition, budgets, files, errors."""

import json
import warnings

import pytest
import torch

import tcnn_fx
from models import TinyResNet
from tcnn_fx import Policy, PolicyError, meta


@pytest.fixture(scope="module")
def graph():
    return tcnn_fx.trace(TinyResNet(), (torch.randn(1, 3, 16, 16),))


@pytest.fixture(scope="module")
def sites(graph):
    return meta.sites(graph)


def chosen(policy, sites):
    return set(Policy.coerce(policy).plan(sites).names)


def test_named_policies(sites):
    assert chosen("stage2", sites) == {"b1", "b2"}
    assert chosen("last", sites) == {"b1", "b2"}
    assert chosen("stage1", sites) == {"a1"}
    with pytest.warns(UserWarning, match="selects no convertible site"):
        assert chosen("stage0", sites) == set()  # the stem alone, excluded by default
    assert chosen("stage1+2", sites) == chosen("stage>=0", sites) == chosen("all", sites) == {"a1", "b1", "b2"}
    with pytest.warns(UserWarning, match="selects no convertible site"):
        assert chosen("stage1 & stage2", sites) == set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'none' asks for nothing (the CNN as is): no warning
        assert chosen("none", sites) == set()


def test_defaults_exclude_stem_and_pointwise_with_reasons(sites):
    plan = Policy("all").plan(sites)
    assert "stem" in plan.skipped["stem"] and "1x1" in plan.skipped["shortcut"]
    assert set(Policy("all", include_stem=True, include_pointwise=True).plan(sites).names) == {
        "stem", "a1", "b1", "b2", "shortcut",
    }  # fmt: skip


def test_rules_names_lists_predicates_and_composition(sites):
    assert chosen("res<=8", sites) == {"b1", "b2"}
    assert chosen("name:b*", sites) == {"b1", "b2"}
    assert chosen("all & ~name:b2", sites) == {"a1", "b1"}
    assert chosen("stage1 or name:b2", sites) == {"a1", "b2"}
    assert chosen(["b2", "shortcut"], sites) == {"b2", "shortcut"}  # explicit lists bypass the defaults
    assert chosen(lambda site: site.geometry.stride == (2, 2), sites) == {"b1"}
    assert chosen(Policy("stage1") | "stage2", sites) == {"a1", "b1", "b2"}
    assert chosen(Policy("all") & ~Policy("name:a1"), sites) == {"b1", "b2"}


def test_budgets_are_whole_model_ratios_taken_from_late_stages_first(graph, sites):
    cost = meta.model_cost(graph)
    by_name = {s.name: s for s in sites}
    budget = cost.flop_ratio([by_name["b1"]]) + 1e-9
    assert cost.flops > sum(s.conv_flops for s in sites)  # the whole model: the head's product counts too
    plan = Policy("all", max_flop_ratio=budget).plan(graph)
    assert plan.names == ("b1",)  # stage 2 before stage 1, graph order within a stage
    assert "FLOP budget" in plan.skipped["b2"] and "FLOP budget" in plan.skipped["a1"]
    assert Policy("all", max_flop_ratio=budget).plan(sites, cost).names == ("b1",)
    with pytest.raises(PolicyError, match="needs the model's cost"):
        Policy("all", max_flop_ratio=budget).plan(sites)
    with pytest.raises(PolicyError, match="impossible"):
        Policy("all", max_flop_ratio=0.9)


@pytest.mark.filterwarnings("ignore:policy .* selects no convertible site")
def test_budgets_survive_composition(graph, sites):
    cost = meta.model_cost(graph)
    by_name = {s.name: s for s in sites}
    tight = cost.flop_ratio([by_name["b2"]]) + 1e-9  # room for b2 alone
    budgeted = Policy("stage1+2", max_flop_ratio=tight)
    for composed in (Policy("stage2") & budgeted, budgeted & "stage2", Policy("all") | budgeted, ~budgeted):
        plan = composed.plan(graph)
        assert composed.max_flop_ratio == tight
        assert cost.flop_ratio(plan.selected) <= tight
    assert (Policy("stage2") & budgeted).plan(graph).names == ("b2",)
    listed = Policy.coerce(["b1"])
    assert set((~listed).plan(graph).names) == {"a1", "b2"}  # the complement of a list, not every site
    with pytest.raises(PolicyError, match="include_stem"):
        Policy("all", include_stem=True) & Policy("stage2")


def test_errors_list_what_exists(sites):
    with pytest.raises(PolicyError, match=r"no stage \[5\]; its stages are 0 \(16x16: stem\), 1 \(16x16: a1\), "
                       r"2 \(8x8: b1 \.\. shortcut\)"):
        Policy("stage5").plan(sites)
    with pytest.raises(PolicyError, match="did you mean"):
        Policy.coerce(["b22"]).plan(sites)
    with pytest.raises(PolicyError, match="no site named 'layer9.\\*'"):
        Policy("name:layer9.*").plan(sites)
    with pytest.raises(PolicyError, match="unknown policy term 'stagex'"):
        Policy("stagex")
    with pytest.raises(PolicyError, match="missing '\\)'"):
        Policy("(stage1 stage2")


def test_listed_site_that_cannot_convert_is_an_error():
    from models import FunctionalNet

    sites = tcnn_fx.trace(FunctionalNet(), (torch.randn(1, 3, 16, 16),)).meta["tcnn_fx.sites"]
    with pytest.raises(PolicyError, match="'shared' is listed but cannot be converted"):
        Policy.coerce(["shared"]).plan(sites)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_policy_files_round_trip(tmp_path, suffix, graph):
    policy = Policy("stage>=1 & ~name:b1", sites=("a1",), max_param_ratio=3.0)
    path = tmp_path / f"policy{suffix}"
    policy.save(path)
    loaded = Policy.load(path)
    assert loaded == policy
    assert loaded.plan(graph).names == policy.plan(graph).names == ("a1", "b2")


def test_predicate_policies_cannot_be_saved():
    with pytest.raises(PolicyError, match="cannot be saved"):
        Policy.coerce(lambda site: True).to_dict()
    with pytest.raises(PolicyError, match="unknown policy fields"):
        Policy.from_dict({"select": "all", "stages": [4]})


# Properties of the language, over generated expressions and strings.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALID_TERMS = ["stage0", "stage1", "stage2", "stage1+2", "stage>=1", "stage<2", "last", "all", "none", "res<=8",
               "res>8", "kernel>=3", "kernel==1", "name:b*", "name:a1", "site:a1", "site:shortcut", "site:stem"]  # fmt: skip
INVALID_TERMS = ["stage5", "stage1+7", "name:zz*", "site:nope"]
quiet = pytest.mark.filterwarnings("ignore:policy .* selects no convertible site")
many = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def expressions(terms):
    return st.recursive(
        st.sampled_from(terms),
        lambda inner: st.one_of(
            inner.map(lambda e: f"~({e})"),
            st.tuples(inner, inner).map(lambda p: f"({p[0]}) & ({p[1]})"),
            st.tuples(inner, inner).map(lambda p: f"({p[0]}) | ({p[1]})"),
        ),
        max_leaves=6,
    )


def names(policy, graph):
    return set(Policy.coerce(policy).plan(graph).names)


@quiet
@many
@given(text=st.one_of(st.text(), st.text(alphabet="stage0123+<=>&|~() alnoreskimt:*._bsiy1", max_size=40)))
def test_any_string_gives_a_plan_or_a_policy_error(graph, text):
    try:
        plan = Policy(text).plan(graph)
    except PolicyError:
        return
    assert isinstance(plan, tcnn_fx.Plan)


@quiet
@many
@given(a=expressions(VALID_TERMS + INVALID_TERMS), b=expressions(VALID_TERMS + INVALID_TERMS))
def test_validation_does_not_depend_on_term_order(graph, a, b):
    outcomes = []
    for text in (f"({a}) | ({b})", f"({b}) | ({a})", f"({a}) & ({b})", f"({b}) & ({a})"):
        try:
            outcomes.append(names(text, graph))
        except PolicyError:
            outcomes.append(PolicyError)
    assert (outcomes[0] is PolicyError) == (outcomes[1] is PolicyError) == (outcomes[2] is PolicyError)
    assert outcomes[0] == outcomes[1] and outcomes[2] == outcomes[3]


@quiet
@many
@given(a=expressions(VALID_TERMS), b=expressions(VALID_TERMS), listed=st.lists(st.sampled_from(["a1", "b1", "stem"])))
def test_de_morgan_and_complement_laws_hold_on_plans(graph, a, b, listed):
    p, q = Policy(a, sites=tuple(listed)), Policy(b)
    universe = names(p | ~p, graph)
    assert names(~(p & q), graph) == names(~p | ~q, graph)
    assert names(~(p | q), graph) == names(~p & ~q, graph)
    assert names(p & ~p, graph) == set()
    assert names(~~p, graph) == names(p, graph)
    assert names(p, graph) | names(~p, graph) == universe and not names(p, graph) & names(~p, graph)
    assert names(Policy(f"~({a})"), graph) == names(~Policy(a), graph)


policies = st.builds(
    Policy,
    select=expressions(VALID_TERMS),
    sites=st.lists(st.sampled_from(["a1", "b1", "b2"]), unique=True).map(tuple),
    include_stem=st.booleans(),
    include_pointwise=st.booleans(),
    max_flop_ratio=st.one_of(st.none(), st.floats(1.0, 10.0)),
    max_param_ratio=st.one_of(st.none(), st.floats(1.0, 10.0)),
)


@quiet
@many
@given(policy=policies)
def test_policies_round_trip_through_json_and_yaml(graph, policy, tmp_path_factory):
    import yaml

    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert Policy.from_dict(yaml.safe_load(yaml.safe_dump(policy.to_dict()))) == policy
    folder = tmp_path_factory.mktemp("policy")
    for suffix in (".json", ".yaml"):
        policy.save(folder / f"p{suffix}")
        assert Policy.load(folder / f"p{suffix}") == policy
    assert names(Policy.from_dict(policy.to_dict()), graph) == names(policy, graph)


@quiet
@many
@given(budgeted=policies.filter(lambda p: p.max_flop_ratio is not None), other=expressions(VALID_TERMS))
def test_every_budget_holds_after_composition(graph, budgeted, other):
    other = Policy(other, include_stem=budgeted.include_stem, include_pointwise=budgeted.include_pointwise)
    cost = meta.model_cost(graph)
    for composed in (budgeted & other, other | budgeted, ~budgeted, ~(other & budgeted)):
        assert cost.flop_ratio(composed.plan(graph).selected) <= budgeted.max_flop_ratio
