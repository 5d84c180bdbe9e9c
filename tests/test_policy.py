"""Policy engine: names, rules, lists, predicates, composition, budgets, files, errors."""

import warnings

import pytest
import torch

import tcnn_fx
from models import TinyResNet
from tcnn_fx import Policy, PolicyError


@pytest.fixture(scope="module")
def sites():
    return tcnn_fx.trace(TinyResNet(), (torch.randn(1, 3, 16, 16),)).meta["tcnn_fx.sites"]


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


def test_budgets_take_late_stages_first(sites):
    by_name = {s.name: s for s in sites}
    total = sum(s.conv_flops for s in sites)
    extra_b1 = by_name["b1"].attention_flops - by_name["b1"].conv_flops
    plan = Policy("all", max_flop_ratio=(total + extra_b1) / total + 1e-9).plan(sites)
    assert plan.names == ("b1",)  # stage 2 before stage 1, graph order within a stage
    assert "FLOP budget" in plan.skipped["b2"] and "FLOP budget" in plan.skipped["a1"]
    with pytest.raises(PolicyError, match="impossible"):
        Policy("all", max_flop_ratio=0.9)


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
def test_policy_files_round_trip(tmp_path, suffix, sites):
    policy = Policy("stage>=1 & ~name:b1", sites=("a1",), max_param_ratio=3.0)
    path = tmp_path / f"policy{suffix}"
    policy.save(path)
    loaded = Policy.load(path)
    assert loaded == policy
    assert loaded.plan(sites).names == policy.plan(sites).names == ("a1", "b2")


def test_predicate_policies_cannot_be_saved():
    with pytest.raises(PolicyError, match="cannot be saved"):
        Policy.coerce(lambda site: True).to_dict()
    with pytest.raises(PolicyError, match="unknown policy fields"):
        Policy.from_dict({"select": "all", "stages": [4]})
