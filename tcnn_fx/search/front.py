"""The Pareto front of a study: table rows, CSV/JSON, a plot, and each point's policy file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna

from tcnn_fx.errors import InvalidInputError
from tcnn_fx.files import atomic_write
from tcnn_fx.policy import Policy

COLUMNS = ("trial", "accuracy", "latency_ratio", "flop_ratio", "param_ratio", "converted", "groups", "seed_point")


def _row(trial: optuna.trial.FrozenTrial, groups: list) -> dict:
    mask = trial.user_attrs.get("mask", "")
    chosen = [label for (label, _), on in zip(groups, mask, strict=False) if on == "1"]
    names = [name for (_, sites), on in zip(groups, mask, strict=False) if on == "1" for name in sites]
    row = {"trial": trial.number, "converted": len(names), "groups": ";".join(chosen) or "(none: the CNN)",
           "seed_point": trial.user_attrs.get("seed_point", ""), "sites": names}  # fmt: skip
    for key in ("accuracy", "latency_ratio", "flop_ratio", "param_ratio"):
        row[key] = trial.user_attrs.get(key)
    return row


def front(study: optuna.Study) -> list[dict]:
    """The Pareto-optimal complete trials, one per mask (repeats served from the cache are left out), best first."""
    groups = study.user_attrs["groups"]
    rows = [_row(t, groups) for t in study.best_trials if "cached_from" not in t.user_attrs]
    first = study.user_attrs["objectives"][0]
    return sorted(rows, key=lambda r: r[first], reverse=first == "accuracy")


def summary(study: optuna.Study) -> dict:
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    failed = {t.number: t.user_attrs.get("error", "") for t in study.get_trials(deepcopy=False)
              if t.state == optuna.trial.TrialState.FAIL}  # fmt: skip
    return {"trials": len(states), **{s: states.count(s) for s in sorted(set(states))}, "failed": failed}


def write(study: optuna.Study, out_dir: str | Path) -> dict[str, Path]:
    """``front.csv``, ``front.json`` and ``policies/trial_N.json`` for every front point."""
    out = Path(out_dir)
    (out / "policies").mkdir(parents=True, exist_ok=True)
    rows = front(study)
    with atomic_write(out / "front.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(out / "front.json") as temporary:
        Path(temporary).write_text(
            json.dumps({"study": study.study_name, **summary(study), "front": rows}, indent=2) + "\n"
        )
    for row in rows:
        export_policy(study, row["trial"], out / "policies" / f"trial_{row['trial']}.json")
    return {"csv": out / "front.csv", "json": out / "front.json", "policies": out / "policies"}


def export_policy(study: optuna.Study, number: int, path: str | Path) -> Policy:
    """Write the policy of trial ``number`` (a site list that ``rewrite(policy=...)`` replays)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise InvalidInputError(f"study {study.study_name!r} has no trial {number} (it has {len(trials)} trials)")
    trial = trials[number]
    if "mask" not in trial.user_attrs:
        raise InvalidInputError(f"trial {number} never sampled a mask (state {trial.state.name.lower()})")
    policy = Policy(select="none", sites=tuple(_row(trial, study.user_attrs["groups"])["sites"]))
    policy.save(path)
    return policy


def plot(study: optuna.Study, path: str | Path) -> None:
    """Accuracy (or the first objective) against latency ratio (or FLOP ratio); front, CNN and 'last' marked."""
    from matplotlib.figure import Figure  # not pyplot: the caller's matplotlib backend is left alone

    groups = study.user_attrs["groups"]
    complete = [_row(t, groups) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    x_key = "latency_ratio" if any(r["latency_ratio"] is not None for r in complete) else "flop_ratio"
    y_key = "accuracy" if any(r["accuracy"] is not None for r in complete) else "param_ratio"
    figure = Figure(figsize=(6.5, 4.5), constrained_layout=True)
    axis = figure.add_subplot()
    axis.scatter([r[x_key] for r in complete], [r[y_key] for r in complete], s=14, color="lightgrey", label="trials")
    best = sorted(front(study), key=lambda r: r[x_key])
    axis.plot([r[x_key] for r in best], [r[y_key] for r in best], "o-", color="tab:blue", label="Pareto front")
    for seed, marker, colour in (("cnn", "s", "black"), ("last", "*", "tab:red")):
        points = [r for r in complete if r["seed_point"] == seed]
        if points:
            axis.scatter([points[0][x_key]], [points[0][y_key]], marker=marker, s=90, color=colour,
                         label="CNN" if seed == "cnn" else "last stage (paper)", zorder=3)  # fmt: skip
    axis.set(xlabel=x_key.replace("_", " "), ylabel=y_key.replace("_", " "), title=study.study_name)
    axis.legend(fontsize=8)
    with atomic_write(path) as temporary:
        figure.savefig(temporary, dpi=120, format=Path(path).suffix.lstrip(".") or "png")


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (accuracy to maximise, cost to minimise) and bounded by ``reference``.

    Two objectives only: a sweep over the points sorted by cost.  (Optuna's
    n-dimensional implementation is private API.)
    """
    ref_accuracy, ref_cost = reference
    useful = sorted((cost, accuracy) for accuracy, cost in points if accuracy > ref_accuracy and cost < ref_cost)
    area, best = 0.0, ref_accuracy
    for i, (cost, accuracy) in enumerate(useful):
        best = max(best, accuracy)
        next_cost = useful[i + 1][0] if i + 1 < len(useful) else ref_cost
        area += (next_cost - cost) * (best - ref_accuracy)
    return area
