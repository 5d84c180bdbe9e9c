"""Capture coverage: does every model of the zoo trace into a site table, and do its conversions verify?

The zoo (``tcnn_fx.models.zoo``) is every torchvision image CNN (classification,
the backbones of the detection models, segmentation, the float builds of the
quantisation models, RAFT's feature encoder) and a broad timm CNN list.
Models are built on the ``meta`` device (no memory, no compute), captured at
their usual input size, shape-propagated and matched into sites; the stage
table is recorded.  With ``--verify``, models are also built for real at a
small input size, with random norm statistics, converted with a policy and
compared with the original (float32 and float64 relative error), which is
slow.  CI runs the capture part (tests/test_zoo_coverage.py).

    python benchmarks/coverage.py [--only torchvision|timm] [--task detection] [--json out.json] [--verify]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
import warnings

import torch

import tcnn_fx
from tcnn_fx.models.zoo import ZooEntry, build_on_meta, randomise_norms, timm_entries, torchvision_entries
from tcnn_fx.stages import stage_table


def entries(only: str | None) -> list[ZooEntry]:
    chosen = []
    if only in (None, "torchvision"):
        chosen += torchvision_entries()
    if only in (None, "timm"):
        chosen += timm_entries()
    return chosen


def capture_row(entry: ZooEntry) -> dict:
    row = {"model": entry.spec, "task": entry.task, "module": entry.module, "input": entry.input_size}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = entry.target(build_on_meta(entry.spec))
            graph_module = tcnn_fx.trace(model, (torch.empty(1, 3, entry.input_size, entry.input_size),))
        sites = graph_module.meta["tcnn_fx.sites"]
        row["_sites"] = sites
        row.update(
            ok=True,
            sites=len(sites),
            convertible=sum(s.convertible for s in sites),
            stages=" ".join(s.describe() for s in stage_table(sites)),
            fallback_leaves=graph_module.meta["tcnn_fx.capture"].fallback_leaves,
        )
    except Exception as error:  # noqa: BLE001 - every failure is recorded with its reason
        row.update(ok=False, error=f"{type(error).__name__}: {error}".splitlines()[0][:300])
        row["trace"] = traceback.format_exc(limit=-3)[-600:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def verify_row(entry: ZooEntry, policy: str, size: int) -> dict:
    """Convert with random weights and compare in float32 and float64; retries at the usual size if needed."""
    row = verify_at(entry, policy, size)
    if "error" in row and size != entry.input_size:
        row = verify_at(entry, policy, entry.input_size) | {"small_input_error": row["error"]}
    return row


def verify_at(entry: ZooEntry, policy: str, size: int) -> dict:
    """Detectors: their backbone, the submodule ``rewrite(..., module=...)`` converts."""
    from tcnn_fx.specs import build

    row = {"model": entry.spec, "policy": policy, "input": size}
    try:
        torch.manual_seed(0)
        model = randomise_norms(entry.target(build(entry.spec)).eval())
        for dtype, key in ((torch.float32, "float32"), (torch.float64, "float64")):
            model = model.to(dtype)
            x = torch.randn(2, 3, size, size, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hybrid = tcnn_fx.rewrite(model, policy, (x,))
            result = tcnn_fx.verify(model, hybrid, (x,))
            row[key] = result.output.max_rel
            row[f"{key}_passed"] = result.passed
            row["converted"] = len(tcnn_fx.report_of(hybrid).converted)
    except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return row


def _verdict(v: dict) -> str:
    if not v:
        return "-"
    if v.get("converted") == 0 and "note" in v:
        return v["note"]
    return "yes" if v.get("float32_passed") and v.get("float64_passed") else "NO"


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table with a summary per library and task."""
    lines = []
    groups = [("torchvision", task) for task in ("classification", "detection", "segmentation", "quantization",
                                                  "optical_flow")] + [("timm", "classification")]  # fmt: skip
    for source, task in groups:
        chosen = [r for r in rows if r["model"].startswith(source) and r.get("task", "classification") == task]
        if not chosen:
            continue
        traced = sum(r["ok"] for r in chosen)
        verified = [r["verify"] for r in chosen if "verify" in r]
        verified = [v for v in verified if "note" not in v]
        passed = sum(bool(v.get("float32_passed") and v.get("float64_passed")) for v in verified)
        module = chosen[0].get("module")
        lines.append(f"**{source} {task}**" + (f" (the `{module}` submodule)" if module else "")
                     + f": {traced}/{len(chosen)} traced ({100 * traced / len(chosen):.1f}%)"
                     + (f"; {passed}/{len(verified)} verified in float32 and float64" if verified else ""))
        lines.append("")
        lines.append("| model | traced at | sites | convertible | stages (resolution: modules) | kept whole | policy | "
                     "verified at | converted | float32 rel. error | float64 rel. error | verified |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in chosen:
            v = r.get("verify", {})
            cells = [r["model"], str(r["input"]), str(r.get("sites", "-")), str(r.get("convertible", "-")),
                     str(r.get("stages", "-")), str(len(r.get("fallback_leaves", {}))) if r["ok"] else r["error"],
                     v.get("policy", "-"), str(v.get("input", "-")), str(v.get("converted", "-")),
                     f"{v['float32']:.1e}" if "float32" in v else v.get("error", "-"),
                     f"{v['float64']:.1e}" if "float64" in v else "-",
                     _verdict(v)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["torchvision", "timm"])
    parser.add_argument("--task", choices=["classification", "detection", "segmentation", "quantization",
                                           "optical_flow"], help="only the models of this task")  # fmt: skip
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--verify", action="store_true", help="also convert and verify with real weights (slow)")
    parser.add_argument("--verify-size", type=int, default=64)
    parser.add_argument("--markdown", help="write the table as Markdown to this file")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --json and run the rest")
    parser.add_argument("--from-json", help="render --markdown from an earlier --json file instead of running")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as source:
            rows = json.load(source)
        with open(args.markdown, "w") as out:
            out.write(markdown(rows))
        return
    rows = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as previous:
            rows = json.load(previous)
    done = {r["model"] for r in rows}
    for entry in entries(args.only):
        if entry.spec in done or (args.task and entry.task != args.task):
            continue
        row = capture_row(entry)
        sites = row.pop("_sites", [])
        if args.verify and row["ok"]:
            policy = "all" if entry.spec.startswith("torchvision:") else "stage4"
            policy = policy if max(s.stage for s in sites) >= 4 or policy == "all" else "last"
            if entry.input_size >= 300 and entry.task == "detection":  # SSD300 verifies at 300 (its extra layers
                policy = f"{policy} & res<=38"  # need it): attention over 150x150 maps would take 36 GB
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                selected = tcnn_fx.Policy(policy).plan(sites).selected
            if selected:
                size = max(args.verify_size, 75 if "inception" in entry.spec else 0)
                row["verify"] = verify_row(entry, policy, size)
            else:  # nothing to convert (ViTs: their only convolution is the patchify stem)
                row["verify"] = {"policy": policy, "converted": 0, "note": "no site selected"}
        rows.append(row)
        status = "ok " if row["ok"] else "FAIL"
        detail = f"{row.get('sites')} sites, {row.get('convertible')} convertible" if row["ok"] else row["error"]
        print(f"{status} {entry.spec:45s} {row['seconds']:6.2f}s  {detail}  {row.get('verify', '')}", flush=True)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=2)
    print("\n".join(line for line in markdown(rows).splitlines() if line.startswith("**")))
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(rows))


if __name__ == "__main__":
    main()
