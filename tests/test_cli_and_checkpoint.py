"""Model specs, checkpoints and the tcnn-fx command line."""

import json
import textwrap

import pytest
import torch

import tcnn_fx
from tcnn_fx import checkpoint, specs
from tcnn_fx.cli import main
from tcnn_fx.models import cifar_resnet


def test_specs_build_each_source(tmp_path):
    assert type(specs.build("torchvision:resnet18")).__name__ == "ResNet"
    assert type(specs.build("timm:resnet10t")).__name__ == "ResNet"
    assert sum(p.numel() for p in specs.build("cifar:resnet20").parameters()) == 269722
    factory = tmp_path / "net.py"
    factory.write_text(textwrap.dedent("""
        from torch import nn
        def make(num_classes=3):
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    """))
    assert isinstance(specs.build(f"{factory}:make")[0], torch.nn.Conv2d)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("resnet50", "not SOURCE:NAME"),
        ("torchvision:resnet5000", "torchvision has no model"),
        ("timm:nope_net", "timm has no model"),
        ("cifar:vgg", "resnetDEPTH"),
        ("cifar:resnet21", "depth 21"),
        ("caffe:alexnet", "unknown model source"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        specs.build(spec)


def test_weights_that_do_not_match(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="do not match"):
        specs.load_model("cifar:resnet20", path)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    x = torch.randn(2, 3, 32, 32)
    hybrid = tcnn_fx.rewrite(model, "last", (x,), spec="cifar:resnet20")
    with torch.no_grad():
        hybrid.get_submodule("layer3.0.conv2").gate.fill_(0.25)  # as after fine-tuning
    checkpoint.save(hybrid, tmp_path / "h.pt")
    loaded = checkpoint.load(tmp_path / "h.pt").eval()
    assert torch.equal(loaded(x), hybrid.eval()(x))
    assert tcnn_fx.report_of(loaded).converted == tcnn_fx.report_of(hybrid).converted
    unnamed = tcnn_fx.rewrite(model, "last", (x,))
    checkpoint.save(unnamed, tmp_path / "u.pt")
    with pytest.raises(ValueError, match="records no model spec"):
        checkpoint.load(tmp_path / "u.pt")
    assert torch.equal(checkpoint.load(tmp_path / "u.pt", model=cifar_resnet(20)).eval()(x), unnamed(x))


def test_cli_sites_and_convert(tmp_path, capsys):
    main(["sites", "cifar:resnet20", "--json", str(tmp_path / "s.json"), "--graphml", str(tmp_path / "s.graphml")])
    table = json.loads((tmp_path / "s.json").read_text())
    assert len(table) == 19 and table[0]["name"] == "conv1" and table[0]["stem"]
    assert (tmp_path / "s.graphml").stat().st_size > 0
    policy = tmp_path / "p.json"
    tcnn_fx.Policy("name:layer3.2.*").save(policy)
    main(["convert", "cifar:resnet20", "--policy", str(policy), "--verify", "--out", str(tmp_path / "h.pt")])
    output = capsys.readouterr().out
    assert "converted layer3.2.conv1" in output and "passed" in output
    assert tcnn_fx.report_of(checkpoint.load(tmp_path / "h.pt")).converted == ("layer3.2.conv1", "layer3.2.conv2")


def test_cli_errors_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "cifar:resnet20", "--policy", "stage5", "--out", "x.pt"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("error: ") and printed.err.count("\n") == 1  # one line, on stderr
    assert "its stages are 0 (32x32: conv1), 1 (32x32: layer1), 2 (16x16: layer2), 3 (8x8: layer3)" in printed.err
