"""The command line fuzzed: malformed specs, policies, paths, checkpoints and weights, ONNX files where a model
goes.  Each is one line ``error: ...`` on stderr naming the culprit, exit status 2, no traceback, and the output
folder exactly as it was.  Also: flags generated from the settings dataclasses, one meaning for ``--batch``."""

import dataclasses
import os
import struct
import subprocess
import sys
from pathlib import Path

import onnx
import onnx.helper
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagefolders import write_imagefolder
from models import TinyResNet

import tcnn_fx
from tcnn_fx import checkpoint
from tcnn_fx.cli import build_parser, main
from tcnn_fx.cli.arguments import recipe_from_args, settings_from_args
from tcnn_fx.models import cifar_resnet
from tcnn_fx.passes.vit import ViTPasses
from tcnn_fx.training import Recipe

MODELS = Path(__file__).with_name("models.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every malformed (and a few good) input files, in one folder the tests only read."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    hybrid = tcnn_fx.rewrite(cifar_resnet(20).eval(), "last", (x,), spec="cifar:resnet20")
    checkpoint.save(hybrid, root / "hybrid.safetensors")
    whole = (root / "hybrid.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (root / "empty.safetensors").write_bytes(b"")
    (root / "random.safetensors").write_bytes(os.urandom(4096))
    (root / "random.pt").write_bytes(os.urandom(4096))
    torch.save(torch.zeros(3), root / "tensor.pt")
    torch.save(cifar_resnet(20).state_dict(), root / "resnet20_state.pt")
    state = (root / "resnet20_state.pt").read_bytes()
    (root / "truncated_state.pt").write_bytes(state[: len(state) // 2])
    tiny = tcnn_fx.rewrite(TinyResNet().eval(), "none", (torch.randn(1, 3, 16, 16),), spec=f"{MODELS}:TinyResNet")
    checkpoint.save(tiny, root / "file_spec.safetensors")
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", 1, [1, 3, 32, 32])], [value("y", 1, [1, 3, 32, 32])])
    onnx.save(onnx.helper.make_model(graph), root / "model.onnx")
    (root / "bad.json").write_text("{not json")
    (root / "list.yaml").write_text("- stage4\n- last\n")
    (root / "bad.yaml").write_text("select: [unclosed\n")
    (root / "unknown_field.json").write_text('{"select": "last", "colour": "red"}')
    (root / "a_file").write_text("a file where a folder should be")
    write_imagefolder(root / "data", {"train": 4, "val": 2}, size=32)
    (root / "no_splits" / "cats").mkdir(parents=True)
    return root


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (hidden ones too) with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def fails(argv: list[str], capsys, *, code: int = 2) -> str:
    """Run the CLI on ``argv``; it must exit with ``code`` and one line ``error: ...`` on stderr. Returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    return err


# (argv with {in} for the inputs folder and {out} for the output folder, text the error must contain)
CASES = [
    # model specs
    (["sites", "nope"], "'nope'"),
    (["sites", "torchvision:nonexistent"], "'nonexistent'"),
    (["sites", "{out}/missing.py:make"], "missing.py"),
    (["sites", "cifar:resnet7"], "depth 7"),
    (["sites", "caffe:alexnet"], "'caffe'"),
    # policies
    (["convert", "cifar:resnet20", "--policy", "stage9", "--out", "{out}/h.safetensors"], "stage9"),
    (["convert", "cifar:resnet20", "--policy", "name:zz", "--out", "{out}/h.safetensors"], "'zz'"),
    (["convert", "cifar:resnet20", "--policy", "((", "--out", "{out}/h.safetensors"], "'(('"),
    (["convert", "cifar:resnet20", "--policy", "stage4 &", "--out", "{out}/h.safetensors"], "'stage4 &'"),
    (["convert", "cifar:resnet20", "--policy", "{in}/bad.json", "--out", "{out}/h.safetensors"], "bad.json"),
    (["convert", "cifar:resnet20", "--policy", "{in}/list.yaml", "--out", "{out}/h.safetensors"], "list.yaml"),
    (["convert", "cifar:resnet20", "--policy", "{in}/bad.yaml", "--out", "{out}/h.safetensors"], "bad.yaml"),
    (["convert", "cifar:resnet20", "--policy", "{in}/unknown_field.json", "--out", "{out}/h.pt"], "colour"),
    (["convert", "cifar:resnet20", "--policy", "{out}/missing.json", "--out", "{out}/h.safetensors"], "missing.json"),
    (["search", "cifar:resnet20", "--out", "{out}/s", "--objectives", "flop_ratio", "--base-policy", "(("], "'(('"),
    # output paths
    (["convert", "cifar:resnet20", "--out", "{out}/missing/h.safetensors"], "missing"),
    (["convert", "cifar:resnet20", "--out", "{in}/a_file/h.safetensors"], "a_file"),
    (["convert", "cifar:resnet20", "--out", "{out}"], "is a folder"),
    (["convert", "cifar:resnet20", "--out", "{out}/h.safetensors", "--onnx", "{out}/missing/h.onnx"], "missing"),
    (["convert", "cifar:resnet20", "--out", "{out}/h.safetensors", "--fixed-resolution"], "--fixed-resolution"),
    (["convert", "cifar:resnet20", "--out", "{out}/h.safetensors", "--content", "matmul"], "--content"),
    (["convert", "cifar:resnet20", "--out", "{out}/h.safetensors", "--onnx", "{out}/h.onnx", "--content", "attention"],
     "opset >= 23"),
    (["sites", "cifar:resnet20", "--json", "{out}/missing/s.json"], "missing"),
    (["sites", "cifar:resnet20", "--graphml", "{in}/a_file/s.graphml"], "a_file"),
    (["bench", "cifar:resnet20", "--json", "{out}/missing/b.json"], "missing"),
    (["analyze", "{in}/hybrid.safetensors", "--data", "{in}/data", "--plot", "{out}/missing/a.png"], "missing"),
    (["evaluate", "cifar:resnet20", "--data", "{in}/data", "--json", "{in}/a_file/r.json"], "a_file"),
    (["finetune", "cifar:resnet20", "--data", "{in}/data", "--out", "{in}/a_file/run"], "a_file"),
    (["search", "cifar:resnet20", "--out", "{in}/a_file/s", "--objectives", "flop_ratio"], "a_file"),
    # data folders
    (["evaluate", "cifar:resnet20", "--data", "{out}/missing_data"], "missing_data"),
    (["evaluate", "cifar:resnet20", "--data", "{in}/no_splits"], "no_splits"),
    (["evaluate", "cifar:resnet20", "--data", "{in}/data"], "--num-classes 3"),
    (["finetune", "cifar:resnet20", "--data", "{out}/missing_data", "--out", "{out}/run"], "missing_data"),
    (
        ["finetune", "cifar:resnet20", "--data", "{in}/data", "--num-classes", "3", "--out", "{out}/run"],
        "--batch-size 128",
    ),
    (["search", "cifar:resnet20", "--out", "{out}/s", "--objectives", "accuracy,flop_ratio"], "--data"),
    (["search", "cifar:resnet20", "--out", "{out}/s", "--data", "{out}/nothing"], "nothing"),
    (
        ["search", "cifar:resnet20", "--out", "{out}/s", "--objectives", "flop_ratio", "--max-flop-ratio", "0.5"],
        "max-flop-ratio 0.5",
    ),
    # checkpoints as MODEL
    (["sites", "{in}/truncated.safetensors"], "truncated.safetensors"),
    (["sites", "{in}/empty.safetensors"], "empty.safetensors"),
    (["sites", "{in}/random.safetensors"], "random.safetensors"),
    (["sites", "{in}/random.pt"], "random.pt"),
    (["sites", "{in}/tensor.pt"], "tensor.pt"),
    (["sites", "{in}/resnet20_state.pt"], "resnet20_state.pt"),
    (["sites", "{in}/model.onnx"], "model.onnx"),
    (["sites", "{out}/missing.safetensors"], "missing.safetensors"),
    (["sites", "{in}/file_spec.safetensors"], "--trust-model-file"),
    (["evaluate", "{in}/truncated.safetensors", "--data", "{in}/data"], "truncated.safetensors"),
    (["analyze", "{in}/random.pt", "--data", "{in}/data"], "random.pt"),
    (["convert", "{in}/model.onnx", "--out", "{out}/h.safetensors"], "model.onnx"),
    (["sites", "{in}/hybrid.safetensors", "--weights", "{in}/resnet20_state.pt"], "--weights"),
    (["evaluate", "{in}/hybrid.safetensors", "--data", "{in}/data", "--num-classes", "3"], "--num-classes"),
    (["finetune", "{in}/hybrid.safetensors", "--data", "{in}/data", "--out", "{out}/run"], "hybrid.safetensors"),
    # weights
    (["sites", "cifar:resnet32", "--weights", "{in}/resnet20_state.pt"], "resnet20_state.pt"),  # another model's
    (["sites", "cifar:resnet20", "--weights", "{in}/hybrid.safetensors"], "give it as MODEL"),
    (["sites", "cifar:resnet20", "--weights", "{in}/truncated_state.pt"], "truncated_state.pt"),
    (["sites", "cifar:resnet20", "--weights", "{in}/random.pt"], "random.pt"),
    (["sites", "cifar:resnet20", "--weights", "{in}/tensor.pt"], "tensor.pt"),
    (["sites", "cifar:resnet20", "--weights", "{out}/missing.pt"], "missing.pt"),
    # runs to resume
    (["finetune", "cifar:resnet20", "--data", "{in}/data", "--out", "{out}", "--resume"], "nothing to resume"),
    # settings the dataclasses refuse
    (["finetune", "cifar:resnet20", "--data", "{in}/data", "--out", "{out}/run", "--lr", "-1"], "lr"),
    (["finetune", "cifar:resnet20", "--data", "{in}/data", "--out", "{out}/run", "--remove-block"], "--conv-stem"),
]


@pytest.mark.parametrize(("argv", "culprit"), CASES, ids=[" ".join(a)[:70] for a, _ in CASES])
def test_malformed_input_is_one_line_and_writes_nothing(inputs, tmp_path, capsys, argv, culprit):
    out = tmp_path / "out"
    out.mkdir()
    before, inputs_before = listing(tmp_path), listing(inputs)
    err = fails([a.format(**{"in": inputs, "out": out}) for a in argv], capsys)
    assert culprit.format(**{"in": inputs, "out": out}) in err
    assert listing(tmp_path) == before and listing(inputs) == inputs_before


def test_a_run_folder_with_a_checkpoint_is_not_overwritten_and_another_models_is_not_resumed(inputs, tmp_path, capsys):
    data = write_imagefolder(tmp_path / "data", {"train": 4, "val": 2}, size=16)
    run = tmp_path / "run"
    common = [f"{MODELS}:TinyResNet", "--data", str(data), "--input-size", "16", "--num-classes", "3", "--out",
              str(run), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--quiet", "--in-memory"]  # fmt: skip
    main(["finetune", *common])
    assert (run / "model.safetensors").is_file() and not (run / "model.pt").exists()
    before = listing(run)
    assert "--resume" in fails(["finetune", *common], capsys)
    assert "another model" in fails(["finetune", *common, "--policy", "last", "--resume"], capsys)
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:100])
    assert "last.pt" in fails(["finetune", *common, "--resume"], capsys)
    after = listing(run)
    assert after.keys() == before.keys() and after["metrics.jsonl"] == before["metrics.jsonl"]
    assert tcnn_fx.report_of(tcnn_fx.load(run / "model.safetensors", trust_model_file=True)).converted == ()


def test_a_file_spec_checkpoint_loads_with_trust_model_file(inputs, capsys):
    main(["sites", str(inputs / "file_spec.safetensors"), "--trust-model-file"])
    assert "convolution sites" in capsys.readouterr().out


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from([b"", b"PK\x03\x04", struct.pack("<Q", 2) + b"{}", struct.pack("<Q", 60) + b'{"a":']),
    body=st.binary(max_size=300),
)
def test_any_bytes_as_a_checkpoint(tmp_path_factory, capsys, prefix, body):
    path = tmp_path_factory.getbasetemp() / "fuzzed.safetensors"
    path.write_bytes(prefix + body)
    assert "fuzzed.safetensors" in fails(["sites", str(path)], capsys)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="/\\"),
               min_size=1, max_size=24).filter(lambda s: not s.startswith("-")))  # fmt: skip
def test_any_text_as_a_model_spec(tmp_path_factory, capsys, monkeypatch, text):
    monkeypatch.chdir(tmp_path_factory.getbasetemp())
    err = fails(["sites", text, "--input-size", "8"], capsys)
    assert any(part in err or repr(part)[1:-1] in err for part in text.split(":") if part)  # as typed, or escaped


def test_a_failure_while_writing_leaves_no_partial_file(inputs, tmp_path, capsys, monkeypatch):
    import tcnn_fx.export
    from tcnn_fx.export.onnx import ExportError

    def half_written(model, path, *args, **kwargs):
        Path(path).write_bytes(b"half an ONNX file")
        raise ExportError("the exporter gave up half way")

    monkeypatch.setattr(tcnn_fx.export, "to_onnx", half_written)
    argv = ["convert", "cifar:resnet20", "--policy", "last", "--out", str(tmp_path / "h.safetensors"),
            "--onnx", str(tmp_path / "h.onnx")]  # fmt: skip
    assert "half way" in fails(argv, capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_verification_exits_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import tcnn_fx.cli.convert

    class Mismatch:
        passed = False

        def table(self) -> str:
            return "output  FAIL"

    monkeypatch.setattr(tcnn_fx.cli.convert, "verify", lambda *args, **kwargs: Mismatch())
    argv = ["convert", "cifar:resnet20", "--policy", "last", "--verify", "--out", str(tmp_path / "h.safetensors")]
    assert "does not match" in fails(argv, capsys, code=1)
    assert list(tmp_path.iterdir()) == []


def test_the_installed_entry_point_prints_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tcnn_fx.cli", "sites", "nope"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: MODEL 'nope'") and done.stderr.count("\n") == 1


def test_argparse_errors_stay_argparses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "cifar:resnet20", "--batch-sizes", "1,x"])
    assert exit_info.value.code == 2 and "usage: tcnn-fx bench" in capsys.readouterr().err


# Flags


def test_one_meaning_for_batch():
    parser = build_parser()
    assert parser.parse_args(["bench", "m:x", "--batch", "1,4"]).batch_sizes == (1, 4)  # the old spelling, same meaning
    assert parser.parse_args(["bench", "m:x", "--batch-sizes", "2"]).batch_sizes == (2,)
    assert parser.parse_args(["convert", "m:x", "--out", "o", "--example-batch", "2"]).example_batch == 2
    assert parser.parse_args(["evaluate", "m:x", "--data", "d", "--batch-size", "64"]).batch_size == 64
    for argv in (["sites", "m:x", "--batch", "2"], ["finetune", "m:x", "--data", "d", "--out", "o", "--batch", "8"]):
        with pytest.raises(SystemExit):  # neither an example batch nor (abbreviated) a loader's batch size
            parser.parse_args(argv)


def test_recipe_flags_are_the_recipe_fields():
    parser = build_parser()
    args = parser.parse_args(["finetune", "m:x", "--data", "d", "--out", "o", "--seed", "3", "--clip-grad", "2",
                              "--no-amp", "--min-lr-ratio", "0.1", "--optimizer", "adamw", "--attention-lr", "1e-3"])  # fmt: skip
    recipe = recipe_from_args(args)
    assert recipe == Recipe(clip_grad_norm=2.0, amp=False, min_lr_ratio=0.1, optimizer="adamw", attention_lr=1e-3,
                            seed=3)  # fmt: skip
    assert (
        parser.parse_args(["finetune", "m:x", "--data", "d", "--out", "o", "--clip-grad-norm", "1"]).clip_grad_norm == 1
    )
    search = parser.parse_args(["search", "m:x", "--out", "o", "--max-flop-ratio", "2"])
    assert recipe_from_args(search, Recipe(epochs=1, warmup_epochs=0.2, workers=0)).epochs == 1
    assert search.max_flop_ratio == 2.0 and search.max_latency_ratio is None
    for field in dataclasses.fields(Recipe):
        if field.name != "seed":
            assert hasattr(args, field.name) and hasattr(search, field.name), field.name
    passes = settings_from_args(ViTPasses, args, seed=args.seed)
    assert passes == ViTPasses(seed=3) and not passes.any
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "m:x", "--data", "d", "--out", "o", "--optimizer", "adam"])


def test_seed_help_says_what_it_seeds():
    parser = build_parser()
    helps = {}
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        (seed,) = [a for a in sub._actions if "--seed" in a.option_strings]
        helps[name] = seed.help
    assert "initial weights" in helps["sites"] and "example input" in helps["convert"]
    assert "data order" in helps["finetune"] and "impulse offsets" in helps["finetune"]
    assert "noise" in helps["evaluate"] and "sample" in helps["analyze"] and "sampler" in helps["search"]
    trust = {name for name, sub in parser._subparsers._group_actions[0].choices.items()
             if any("--trust-model-file" in a.option_strings for a in sub._actions)}  # fmt: skip
    assert trust == {"sites", "convert", "bench", "evaluate", "analyze", "search"}  # finetune takes no checkpoint


def test_analyze_titles_its_figure_by_spec_and_policy(inputs, tmp_path, capsys, monkeypatch):
    from tcnn_fx import analysis

    plot, titles = analysis.plot, []

    def spy(*args, **kwargs):
        figure = plot(*args, **kwargs)
        titles.append(figure._suptitle.get_text())
        return figure

    monkeypatch.setattr(analysis, "plot", spy)
    main(["analyze", str(inputs / "hybrid.safetensors"), "--data", str(inputs / "data"), "--images", "3",
          "--plot", str(tmp_path / "a.png")])  # fmt: skip
    (title,) = titles
    assert "cifar:resnet20" in title and "last" in title and "hybrid" not in title and str(inputs) not in title
    assert (tmp_path / "a.png").stat().st_size > 1000 and [p.name for p in tmp_path.iterdir()] == ["a.png"]
