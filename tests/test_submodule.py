"""Rewriting a submodule (a detector's backbone) inside the whole model, and hybrids at other input sizes."""

import warnings

import pytest
import torch

import tcnn_fx
from models import StaticSameNet
from tcnn_fx.models.zoo import randomise_norms
from tcnn_fx.specs import build
from tcnn_fx.submodule import SubmoduleError

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def detector():
    """A Faster R-CNN with random weights (nothing downloaded) that resizes images to 96 pixels."""
    torch.manual_seed(0)
    model = build("torchvision:fasterrcnn_resnet50_fpn")
    model.transform.min_size, model.transform.max_size = (96,), 96
    return randomise_norms(model.eval())


def test_specs_build_detectors_without_downloading(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_network)
    with pytest.raises(AssertionError, match="download"), torch.device("meta"):  # the library default would
        torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None)
    for name in ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"):
        with torch.device("meta"):
            build(f"torchvision:{name}")


def test_backbone_rewrite_returns_the_whole_detector(detector):
    before = {k: v.clone() for k, v in detector.state_dict().items()}
    x = torch.rand(1, 3, 120, 100)
    hybrid = tcnn_fx.rewrite(detector, "stage4", (x,), module="backbone.body")
    assert type(hybrid) is type(detector) and isinstance(hybrid.backbone.body, torch.fx.GraphModule)
    report = tcnn_fx.report_of(hybrid)
    assert report.recipe.module == "backbone.body" and report.recipe.input_shapes == ((1, 3, 96, 96),)
    assert report.converted == ("layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2")
    assert not any(isinstance(m, torch.fx.GraphModule) for m in detector.modules())  # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in detector.state_dict().items())
    assert set(detector.state_dict()) <= set(hybrid.state_dict())  # every weight keeps its key
    check = tcnn_fx.verify(detector, hybrid, (x,))
    assert check.passed and len(check.sites) == 3, check.table()
    with torch.no_grad():  # the whole detector runs, at any image size
        for image in (torch.rand(3, 80, 130), torch.rand(3, 100, 100)):
            assert set(hybrid([image])[0]) == {"boxes", "labels", "scores"}


def test_saved_backbone_rewrite_loads_without_running_the_detector(detector, tmp_path):
    hybrid = tcnn_fx.rewrite(detector, "stage4", (torch.rand(1, 3, 96, 96),), module="backbone.body",
                             spec="torchvision:fasterrcnn_resnet50_fpn")  # fmt: skip
    tcnn_fx.save(hybrid, tmp_path / "detector.pt")
    loaded = tcnn_fx.load(tmp_path / "detector.pt").eval()
    assert tcnn_fx.recipe_of(loaded).module == "backbone.body"
    features = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        for name, value in hybrid.backbone.body(features).items():
            assert torch.equal(loaded.backbone.body(features)[name], value)


def test_segmentation_backbone_and_explicit_inputs():
    torch.manual_seed(0)
    model = randomise_norms(build("torchvision:fcn_resnet50").eval())
    inputs = (torch.randn(1, 3, 64, 64),)
    hybrid = tcnn_fx.rewrite(model, "stage4", module="backbone", module_inputs=inputs, verify=True)
    assert tcnn_fx.report_of(hybrid).converted[0] == "layer4.0.conv2"
    assert tcnn_fx.verify(model, hybrid, None, module_inputs=inputs).passed
    with torch.no_grad():  # the rewritten backbone keeps its dilation: the segmentation runs at other sizes
        y = torch.randn(1, 3, 48, 80)
        assert torch.allclose(hybrid(y)["out"], model(y)["out"], rtol=1e-4, atol=1e-5)


def test_submodule_errors_say_what_exists(detector):
    x = (torch.rand(1, 3, 96, 96),)
    with pytest.raises(SubmoduleError, match=r"no submodule 'backbone\.bdy'; did you mean \['backbone\.body'"):
        tcnn_fx.rewrite(detector, "stage4", x, module="backbone.bdy")
    with pytest.raises(SubmoduleError, match="receives .*OrderedDict.*not positional tensors only"):
        tcnn_fx.rewrite(detector, "all", x, module="backbone.fpn")
    googlenet = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).eval()
    with pytest.raises(SubmoduleError, match="'aux1' is not called .*; name a module that is called"):
        tcnn_fx.rewrite(googlenet, "all", (torch.rand(1, 3, 64, 64),), module="aux1")
    with pytest.raises(tcnn_fx.PolicyError, match=r"no stage \[7\]; its stages are 0 \(48x48: conv1\)"):
        tcnn_fx.rewrite(detector, "stage7", x, module="backbone.body")
    with pytest.raises(TypeError, match="pass module too"):
        tcnn_fx.rewrite(detector, "stage4", x, module_inputs=x)


def test_cli_converts_a_detector_backbone(tmp_path, capsys):
    from tcnn_fx.cli import main

    with pytest.raises(SystemExit):
        main(["sites", "torchvision:ssdlite320_mobilenet_v3_large", "--module", "backbone.features"])
    assert "modules near it that are called: ['backbone', 'backbone.features.0'" in capsys.readouterr().err
    main(["sites", "torchvision:ssdlite320_mobilenet_v3_large", "--module", "backbone", "--input-size", "64"])
    output = capsys.readouterr().out
    assert "stages" in output and "(stem)" in output
    out = tmp_path / "ssd.pt"
    main(["convert", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--module", "backbone.body", "--policy",
          "last", "--verify", "--out", str(out), "--input-size", "64"])  # fmt: skip
    output = capsys.readouterr().out
    assert "passed" in output and out.is_file()
    assert tcnn_fx.recipe_of(tcnn_fx.load(out)).module == "backbone.body"


@pytest.mark.parametrize("dtype", [torch.float64])
def test_hybrids_rewritten_at_one_size_run_exactly_at_others(dtype):
    """Positional maps follow the input size and computed 'same' pads stay in the graph."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    models = [
        (torchvision.models.resnet18(), "stage4"),
        (timm.create_model("tf_efficientnet_b0"), "stage>=4"),  # TensorFlow 'same' pads computed from the size
        (StaticSameNet(), "all"),
    ]
    for model, policy in models:
        model = randomise_norms(model).eval().to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hybrid = tcnn_fx.rewrite(model, policy, (torch.randn(1, 3, 64, 64, dtype=dtype),))
        assert tcnn_fx.report_of(hybrid).converted
        with torch.no_grad():
            for shape in ((2, 3, 64, 64), (1, 3, 65, 71), (1, 3, 96, 48), (1, 3, 33, 40)):
                x = torch.randn(shape, dtype=dtype)
                expected = model(x)
                error = ((hybrid(x) - expected).abs().max() / expected.abs().max()).item()
                assert error <= 1e-10, (type(model).__name__, shape, error)


def test_an_untraceable_top_level_points_to_module_and_module_works():
    class Segmenter(torch.nn.Module):
        """Checks its input size with Python control flow, as segmentation packages do."""

        def __init__(self):
            super().__init__()
            self.encoder = torchvision.models.resnet18()
            self.encoder.fc = torch.nn.Identity()

        def forward(self, x):
            if x.shape[-1] % 32:
                raise ValueError("the input must be a multiple of 32")
            return self.encoder(x)

    model = randomise_norms(Segmenter()).eval()
    x = (torch.randn(1, 3, 64, 64),)
    with pytest.raises(tcnn_fx.CaptureError, match=r"Segmenter.forward itself.*module=PATH.*\['encoder'\]"):
        tcnn_fx.rewrite(model, "stage4", x)
    hybrid = tcnn_fx.rewrite(model, "stage4", x, module="encoder", verify=True)
    assert tcnn_fx.report_of(hybrid).converted[0] == "layer4.0.conv1"
