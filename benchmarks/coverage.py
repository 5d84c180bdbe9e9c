"""Capture coverage: does every torchvision classification model and a broad timm CNN list trace into a site table?

Models are built on the ``meta`` device (no memory, no compute), captured at
their usual input size, shape-propagated on fake tensors and matched into
sites.  With ``--verify``, models are also built for real at a small input
size, converted with a policy and compared with the original (float32 and
float64 relative error), which is slow.

    python benchmarks/coverage.py [--only torchvision|timm] [--json out.json] [--verify]
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

#: timm CNNs of many families, including ones plain symbolic_trace fails on (vgg11, dm_nfnet_f0).
TIMM_MODELS = [
    "resnet18", "resnet50", "resnet50d", "resnet101d", "resnetrs50", "resnetrs101", "resnet26t", "resnet10t",
    "seresnet50", "ecaresnet50d", "resnext50_32x4d", "seresnext26d_32x4d", "skresnet18", "resnetblur50",
    "regnetx_002", "regnety_008", "regnetz_b16", "efficientnet_b0", "efficientnet_b3", "tf_efficientnet_b0",
    "tf_efficientnetv2_s", "efficientnetv2_rw_t", "mobilenetv2_100", "mobilenetv3_large_100", "tf_mobilenetv3_small_100",
    "mnasnet_100", "fbnetc_100", "lcnet_050", "convnext_atto", "convnext_tiny", "convnextv2_atto", "densenet121",
    "dla34", "dla46_c", "res2net50_26w_4s", "res2next50", "cspresnet50", "cspdarknet53", "darknet53", "hrnet_w18_small",
    "vgg11", "vgg16_bn", "repvgg_a2", "dm_nfnet_f0", "nf_resnet50", "ghostnet_100", "ghostnetv2_100", "xception41",
    "legacy_xception", "inception_v3", "inception_v4", "inception_resnet_v2", "vovnet39a", "ese_vovnet19b_dw",
    "rexnet_100", "selecsls42b", "dpn68", "tresnet_m", "gernet_s", "hardcorenas_a", "mixnet_s", "tinynet_a",
    "resnest14d", "nasnetalarge", "pnasnet5large", "cs3darknet_s", "bat_resnext26ts", "botnet26t_256",
    "mobileone_s0", "fastvit_t8", "efficientvit_b0", "repghostnet_050",
]  # fmt: skip

INPUT_SIZE = {"inception_v3": 299, "inception_v4": 299, "inception_resnet_v2": 299, "nasnetalarge": 331,
              "pnasnet5large": 331, "botnet26t_256": 256, "bat_resnext26ts": 256}  # fmt: skip


def torchvision_models() -> list[str]:
    import torchvision

    return [f"torchvision:{name}" for name in torchvision.models.list_models(module=torchvision.models)]


def input_size(spec: str) -> int:
    name = spec.split(":", 1)[1]
    if spec.startswith("torchvision:") and name == "inception_v3":
        return 299
    return INPUT_SIZE.get(name, 224)


def capture_row(spec: str) -> dict:
    from tcnn_fx.specs import build

    row = {"model": spec, "input": input_size(spec)}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.device("meta"):
                    model = build(spec).eval()
            except NotImplementedError:  # an initialiser that reads values (torchvision's RegNets): build for real
                model = build(spec).eval()
            graph_module = tcnn_fx.trace(model, (torch.empty(1, 3, row["input"], row["input"]),))
        sites = graph_module.meta["tcnn_fx.sites"]
        row["_sites"] = sites
        row.update(
            ok=True,
            sites=len(sites),
            convertible=sum(s.convertible for s in sites),
            stages=max((s.stage for s in sites), default=-1) + 1,
            fallback_leaves=graph_module.meta["tcnn_fx.capture"].fallback_leaves,
        )
    except Exception as error:  # noqa: BLE001 - every failure is recorded with its reason
        row.update(ok=False, error=f"{type(error).__name__}: {error}".splitlines()[0][:300])
        row["trace"] = traceback.format_exc(limit=-3)[-600:]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random affine parameters and statistics for every norm layer.

    Libraries initialise the last norm of residual branches to zero (timm's
    ``zero_init_last``), which would hide the converted convolutions from the
    whole-model comparison; random norms make every branch count.
    """
    with torch.no_grad():
        for module in model.modules():
            if "Norm" not in type(module).__name__:
                continue
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if not tensor.is_floating_point():
                    continue
                if name in ("weight", "running_var"):
                    tensor.uniform_(0.5, 1.0)
                elif name in ("bias", "running_mean"):
                    tensor.normal_(0.0, 0.05)
    return model


def verify_row(spec: str, policy: str, size: int) -> dict:
    """Convert with random weights and compare in float32 and float64; retries at the usual size if needed."""
    row = verify_at(spec, policy, size)
    if "error" in row and size != input_size(spec):
        row = verify_at(spec, policy, input_size(spec)) | {"small_input_error": row["error"]}
    return row


def verify_at(spec: str, policy: str, size: int) -> dict:
    from tcnn_fx.specs import build

    row = {"model": spec, "policy": policy, "input": size}
    try:
        torch.manual_seed(0)
        model = randomise_norms(build(spec).eval())
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
    """The rows as a Markdown table with a summary per library."""
    lines = []
    for source in ("torchvision", "timm"):
        chosen = [r for r in rows if r["model"].startswith(source)]
        if not chosen:
            continue
        traced = sum(r["ok"] for r in chosen)
        verified = [r["verify"] for r in chosen if "verify" in r]
        verified = [v for v in verified if "note" not in v]
        passed = sum(bool(v.get("float32_passed") and v.get("float64_passed")) for v in verified)
        lines.append(f"**{source}**: {traced}/{len(chosen)} traced ({100 * traced / len(chosen):.1f}%)"
                     + (f"; {passed}/{len(verified)} verified in float32 and float64" if verified else ""))
        lines.append("")
        lines.append("| model | traced at | sites | convertible | stages | kept whole | policy | verified at | "
                     "converted | float32 rel. error | float64 rel. error | verified |")
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
    specs = []
    if args.only in (None, "torchvision"):
        specs += torchvision_models()
    if args.only in (None, "timm"):
        specs += [f"timm:{name}" for name in TIMM_MODELS]
    rows = []
    if args.resume and args.json and os.path.exists(args.json):
        with open(args.json) as previous:
            rows = json.load(previous)
    done = {r["model"] for r in rows}
    for spec in specs:
        if spec in done:
            continue
        row = capture_row(spec)
        sites = row.pop("_sites", [])
        if args.verify and row["ok"]:
            policy = "all" if spec.startswith("torchvision:") else "stage4"
            policy = policy if row["stages"] > 4 or policy == "all" else "last"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                selected = tcnn_fx.Policy(policy).plan(sites).selected
            if selected:
                size = max(args.verify_size, 75 if "inception" in spec else 0)
                row["verify"] = verify_row(spec, policy, size)
            else:  # nothing to convert (ViTs: their only convolution is the patchify stem)
                row["verify"] = {"policy": policy, "converted": 0, "note": "no site selected"}
        rows.append(row)
        status = "ok " if row["ok"] else "FAIL"
        detail = f"{row.get('sites')} sites, {row.get('convertible')} convertible" if row["ok"] else row["error"]
        print(f"{status} {spec:45s} {row['seconds']:6.2f}s  {detail}  {row.get('verify', '')}", flush=True)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(rows, out, indent=2)
    print("\n".join(line for line in markdown(rows).splitlines() if line.startswith("**")))
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(rows))


if __name__ == "__main__":
    main()
