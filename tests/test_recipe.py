"""One record per rewrite: the recipe replays the graph rewrite saw; one cost model gives every ratio."""

import pytest
import torch
from torch import nn

import tcnn_fx
from tcnn_fx import Policy, meta
from tcnn_fx.search import SearchSpace
from tcnn_fx.specs import load_model


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


class Net(nn.Module):
    """A block kept whole changes the graph's node names: the site after it reads ``block``, not ``add``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(8)
        self.head = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


@pytest.mark.parametrize("leaf", [Block, "block"])
def test_leaf_modules_are_recorded_and_replayed(tmp_path, leaf):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 12, 12)
    hybrid = tcnn_fx.rewrite(model, "all", (x,), leaf_modules=[leaf])
    recipe = tcnn_fx.recipe_of(hybrid)
    assert (recipe.leaf_names, recipe.leaf_types) == ((("block",), ()) if leaf == "block" else ((), (f"{__name__}.Block",)))
    assert tcnn_fx.report_of(hybrid).converted == ("head",)  # its input node is the kept-whole block
    assert tcnn_fx.verify(model, hybrid, (x,)).passed  # verify captures the original as rewrite did
    tcnn_fx.save(hybrid, tmp_path / "h.safetensors")
    loaded = tcnn_fx.load(tmp_path / "h.safetensors", model=Net())
    assert tcnn_fx.recipe_of(loaded) == recipe
    assert tcnn_fx.report_of(loaded).converted == tcnn_fx.report_of(hybrid).converted


def test_a_leaf_type_the_model_lacks_is_named():
    recipe = tcnn_fx.recipe.RewriteRecipe(leaf_types=("somewhere.Missing",))
    with pytest.raises(tcnn_fx.TcnnFxError, match="somewhere.Missing"):
        recipe.leaf_modules(Net())


def test_recipe_round_trips_and_refuses_foreign_fields():
    torch.manual_seed(0)
    hybrid = tcnn_fx.rewrite(Net().double().eval(), "all", (torch.randn(1, 3, 8, 8, dtype=torch.float64),), fold_norm=True)
    recipe = tcnn_fx.recipe_of(hybrid)
    assert recipe.input_dtype == "float64" and recipe.fold_norm
    assert tcnn_fx.RewriteRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(tcnn_fx.TcnnFxError, match="unknown RewriteRecipe fields"):
        tcnn_fx.RewriteRecipe.from_dict({**recipe.to_dict(), "exec": "print()"})
    with pytest.raises(tcnn_fx.TcnnFxError, match="upgrade"):
        tcnn_fx.RewriteRecipe.from_dict({**recipe.to_dict(), "version": 99})


def test_one_cost_model_for_report_policy_and_search():
    torch.manual_seed(0)
    model = load_model("cifar:resnet20").eval()
    x = torch.randn(4, 3, 32, 32)
    graph = tcnn_fx.trace(model, (x,))
    cost = meta.model_cost(graph)
    assert cost.params == sum(p.numel() for p in model.parameters())
    plan = Policy("last").plan(graph)
    hybrid = tcnn_fx.rewrite(model, "last", (x,))
    report = tcnn_fx.report_of(hybrid)
    assert report.flop_ratio == pytest.approx(cost.flop_ratio(plan.selected), rel=1e-12)
    assert report.param_ratio == pytest.approx(cost.param_ratio(plan.selected), rel=1e-12)
    assert report.hybrid_params == sum(p.numel() for p in hybrid.parameters())  # the model counts what is there
    space = SearchSpace.build(model, (x,), base_policy="last", grouping="stage")
    assert space.flop_ratio((True,)) == pytest.approx(report.flop_ratio, rel=1e-12)
    assert space.param_ratio((True,)) == pytest.approx(report.param_ratio, rel=1e-12)
    budget = Policy("last", max_param_ratio=report.param_ratio)
    assert budget.plan(graph).names == report.converted  # the report's ratio is exactly the budget's measure
    assert len(Policy("last", max_param_ratio=report.param_ratio - 1e-6).plan(graph).names) < len(report.converted)
