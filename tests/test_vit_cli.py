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
    model = tcnn_fx.load(run / "model.safetensors", trust_model_file=True)  # the spec is a Python file
    assert isinstance(model.get_submodule("patch_embed.proj"), ConvStem)
    assert [s.name for s in find_attention_sites(model)] == ["blocks.0.attn"]  # one block removed
    main(["evaluate", str(run / "model.safetensors"), "--trust-model-file", "--data", str(dataset), "--corruptions",
          "contrast", "--severities", "1", "--json", str(tmp_path / "robust.json"), "--quiet"])  # fmt: skip
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
        (["--remove-block"], "remove_block (--remove-block) goes with conv_stem (--conv-stem)"),
        (
            ["--impulse-kernel", "5", "--impulse-order", "fixed"],
            "impulse_kernel (--impulse-kernel), impulse_order (--impulse-order) need attention_init impulse",
        ),
        (
            ["--attention-init", "mimetic", "--impulse-target", "distance"],
            "impulse_target (--impulse-target) need attention_init impulse (--attention-init impulse); it is mimetic",
        ),
        (["--attention-init", "impulse", "--impulse-kernel", "4"], "impulse_kernel (--impulse-kernel) must be odd"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *extra])
        printed = capsys.readouterr()
        assert exit_info.value.code == 2 and printed.err.count("\n") == 1 and message in printed.err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_passes_as_one_library_call(dataset):
    import torch
    from models import tiny_vit

    from tcnn_fx.errors import InvalidInputError
    from tcnn_fx.passes.vit import ViTPasses, apply_vit_passes, measure_impulse_mass
    from tcnn_fx.training import ImageFolderData, Preprocessing

    torch.manual_seed(0)
    model, x = tiny_vit(num_classes=3), (torch.randn(1, 3, 16, 16),)
    vit, records = apply_vit_passes(model, x, ViTPasses(conv_stem=True, position_scale=1.0, attention_init="impulse"))
    assert not isinstance(model.get_submodule("patch_embed.proj"), ConvStem)  # the model is untouched
    assert isinstance(vit.get_submodule("patch_embed.proj"), ConvStem)
    assert records.stem_record == {"widths": list(records.conv_stem.widths), "remove_block": False}
    assert records.position_factor > 0 and records.attention_init.method == "impulse"
    split = ImageFolderData(dataset / "val", Preprocessing(16).eval(), in_memory=True)
    mass = measure_impulse_mass(vit, records.attention_init, split, images=6)
    assert mass.images == 6 and set(mass.to_dict()["in_model_mass"]) == {"blocks.0.attn", "blocks.1.attn"}
    assert len(mass.lines()) == 2
    assert apply_vit_passes(model, x, ViTPasses())[1] == type(records)()  # nothing asked, nothing done
    with pytest.raises(InvalidInputError, match="impulse_order"):
        ViTPasses(attention_init="mimetic", impulse_order="fixed")
    with pytest.raises(InvalidInputError, match="position_scale"):
        ViTPasses(position_scale=0)
