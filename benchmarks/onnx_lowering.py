"""ONNX Runtime latency of ResNet-50 hybrids under each lowering, against the CNN, side by side in one run.

A hybrid straight from ``rewrite`` has every content weight at zero, so its
file is the CNN's graph (``taps`` + ``none``); a fine-tuned one has opened
them.  This script times both: the hybrid at initialisation and copies with
every head's content weight set to ``--content-weight`` (as after
fine-tuning), under the cost model's choice (``auto``) and each forced
lowering, with dynamic and fixed resolution.  Every file is checked against
PyTorch with ONNX Runtime before timing; all sessions of a policy are timed
interleaved, round by round (median, with the spread of the rounds).

    python benchmarks/onnx_lowering.py [--rounds 10] [--batch 8] [--json docs/results/onnx_lowering.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import tcnn_fx
from tcnn_fx.export import to_onnx, verify_onnx
from tcnn_fx.export.bench import with_content_weight
from tcnn_fx.export.lowering import ATTENTION_OPSET, Lowering
from tcnn_fx.export.onnx import _session
from tcnn_fx.timing import time_side_by_side

#: name: (open gates, lowering, opset, dynamic resolution)
VARIANTS = {
    "init (auto)": (False, Lowering(), 18, True),
    "open, auto": (True, Lowering(), 18, True),
    "open, maps+matmul (own graph)": (True, Lowering(positional="maps", content="matmul"), 18, True),
    "open, maps+matmul, fixed resolution": (True, Lowering(positional="maps", content="matmul"), 18, False),
    "open, taps+matmul": (True, Lowering(positional="taps", content="matmul"), 18, True),
    "open, taps+attention": (True, Lowering(positional="taps", content="attention"), ATTENTION_OPSET, True),
}


def measure(policy: str, batch: int, rounds: int, weight: float, folder: Path) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(batch, 3, 224, 224)
    hybrid = tcnn_fx.rewrite(model, policy, (x[:2],)).eval()
    opened = with_content_weight(hybrid, weight)
    sessions, lowerings = {}, {}
    example = (torch.randn(2, 3, 224, 224),)
    for name, (open_gates, lowering, opset, dynamic) in {"cnn": (False, None, 18, True), **VARIANTS}.items():
        module = model if name == "cnn" else (opened if open_gates else hybrid)
        path = folder / f"{policy}-{len(sessions)}.onnx"
        start = time.perf_counter()
        to_onnx(module, path, example, lowering=lowering, opset=opset, dynamic_resolution=dynamic)
        verify_onnx(module, path, (x,))
        print(f"{policy} {name}: exported and verified in {time.perf_counter() - start:.0f} s", flush=True)
        sessions[name] = _session(path, "CPUExecutionProvider", spinning=False)
        lowerings[name] = _lowering_summary(path)
    feeds = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
    timing = time_side_by_side(
        {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}, warmup=2, rounds=rounds
    )
    cnn = timing["cnn"].median
    report = tcnn_fx.report_of(hybrid)
    return {
        "flop_ratio": report.flop_ratio,
        "cnn_s": cnn,
        "variants": {
            name: {
                "median_s": timing[name].median,
                "ratio": timing[name].median / cnn,
                "ratio_of_flop_ratio": timing[name].median / cnn / report.flop_ratio,
                "spread_s": [timing[name].low, timing[name].high],
                "lowering": lowerings[name],
            }
            for name in VARIANTS
        },
    }


def _lowering_summary(path: Path) -> dict[str, int]:
    """How many layers got each (positional, content) choice, from the file's metadata."""
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    counts: dict[str, int] = {}
    for name, choice in json.loads(metadata.get("lowering", "{}")).items():
        if name != "options":
            key = f"{choice['positional']}+{choice['content']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--content-weight", type=float, default=0.1, help="every head's content weight when open")
    parser.add_argument("--policies", default="stage4,stage3+4")
    parser.add_argument("--json")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {"batch": args.batch, "content_weight": args.content_weight, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="tcnn_fx-lowering-") as folder:
        for policy in args.policies.split(","):
            results[policy] = measure(policy, args.batch, args.rounds, args.content_weight, Path(folder))
    results["seconds"] = time.perf_counter() - start
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
