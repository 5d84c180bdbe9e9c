"""``tcnn-fx finetune`` with the ViT passes: conv stem and attention init, trained, saved and reloaded."""

import json
from pathlib import Path

import pytest
from imagefolders import write_imagefolder

import tcnn_fx
from tcnn_fx.cli import main
from tcnn_fx.layers import ConvStem
from tcnn_fx.tokens import find_attention_sites

SPEC = f"{Path(__file__).with_name('models.py')}:tiny_vit"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("init", ["impulse", "mimetic"])
def test_finetune_with_vit_passes(dataset, tmp_path, capsys, init):
    run = tmp_path / "run"
    extra = ["--position-scale", "1"] if init == "impulse" else []
    main(["finetune", SPEC, "--data", str(dataset), "--input-size", "16", "--num-classes", "3", "--conv-stem",
          "--remove-block", "--attention-init", init, *extra, "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "1",
          "--batch-size", "8", "--workers", "0", "--quiet", "--in-memory", "--out", str(run)])  # fmt: skip
    printed = " ".join(capsys.readouterr().out.split())
    assert "conv stem at 'patch_embed.proj'" in printed and f"{init} init of 1 attention layers" in printed
    if init == "impulse":  # how convolutional the heads are, on positions and on real images, printed and saved
        record = json.loads((run / "attention_init.json").read_text())
        assert set(record["in_model_mass"]) == {"blocks.0.attn"} and record["images"] == 24
        assert "in the model on 24 images" in printed
    model = tcnn_fx.load(run / "model.pt")
    assert isinstance(model.get_submodule("patch_embed.proj"), ConvStem)
    assert [s.name for s in find_attention_sites(model)] == ["blocks.0.attn"]  # one block removed
    main(["evaluate", str(run / "model.pt"), "--data", str(dataset), "--corruptions", "contrast", "--severities", "1",
          "--json", str(tmp_path / "robust.json"), "--quiet"])  # fmt: skip
    clean = json.loads((tmp_path / "robust.json").read_text())["clean_top1"]
    assert clean == json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_top1"]


def test_flags_that_need_another_flag(dataset, tmp_path, capsys):
    common = [
        "finetune",
        SPEC,
        "--data",
        str(dataset),
        "--input-size",
        "16",
        "--num-classes",
        "3",
        "--out",
        str(tmp_path),
    ]
    for extra, message in (
        (["--remove-block"], "--remove-block goes with --conv-stem"),
        (["--impulse-kernel", "5", "--impulse-order", "fixed"], "--impulse-kernel, --impulse-order need --attention-init"),
        (
            ["--attention-init", "mimetic", "--impulse-target", "distance"],
            "--impulse-target need --attention-init impulse",
        ),
    ):
        with pytest.raises(SystemExit):
            main([*common, *extra])
        assert message in " ".join(capsys.readouterr().out.split())
