"""Search: the space and its exact costs, the Optuna study (seeds, cache, failures, constraints, resume,
two workers), the front and its policies, the CLI."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import torch
from imagefolders import write_imagefolder

import tcnn_fx
import tcnn_fx.search.study
from tcnn_fx.cli import main
from tcnn_fx.policy import Policy
from tcnn_fx.search import Constraints, SearchSettings, SearchSpace, load_study, run_search
from tcnn_fx.search import front as fronts
from tcnn_fx.search.front import hypervolume
from tcnn_fx.search.study import pareto_mask
from tcnn_fx.specs import load_model

X = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return load_model("cifar:resnet20").eval()


@pytest.fixture(scope="module")
def space(resnet20):
    return SearchSpace.build(resnet20, (X,), "stage>=2", "site")


class Synthetic:
    """A deterministic pseudo-accuracy; records every evaluation; fails on request."""

    def __init__(self, fail_on=(), nan_on=()):
        self.calls, self.fail_on, self.nan_on = [], set(fail_on), set(nan_on)

    def __call__(self, mask, objective):
        assert objective == "accuracy"
        key = "".join("1" if m else "0" for m in mask)
        self.calls.append(key)
        if key in self.fail_on:
            raise RuntimeError("CUDA out of memory (simulated)")
        if key in self.nan_on:
            return float("nan")
        return 0.8 + sum((i % 3 - 0.8) * 0.01 for i, on in enumerate(mask) if on)


SETTINGS = SearchSettings(objectives=("accuracy", "flop_ratio"), trials=24, population=8)


@pytest.mark.parametrize(("grouping", "groups"), [("site", 12), ("block", 6), ("stage", 2)])
def test_space_groups_and_exact_costs(resnet20, grouping, groups):
    space = SearchSpace.build(resnet20, (X,), "stage>=2", grouping)
    assert len(space.groups) == groups and space.size == 2**groups
    assert sum(len(g.sites) for g in space.groups) == 12
    mask = tuple(i % 2 == 0 for i in range(groups))
    report = tcnn_fx.report_of(tcnn_fx.rewrite(resnet20, space.policy(mask), (X,)))
    assert set(report.converted) == set(space.names(mask))
    assert space.flop_ratio(mask) == pytest.approx(report.flop_ratio, rel=1e-12)
    assert space.param_ratio(mask) == pytest.approx(report.param_ratio, rel=1e-12)
    assert space.mask_of(space.names(mask)) == mask


def test_space_errors(resnet20, space):
    with pytest.raises(ValueError, match="search space is empty"):
        SearchSpace.build(resnet20, (X,), "none")
    with pytest.raises(ValueError, match="grouping"):
        SearchSpace.build(resnet20, (X,), "all", "layer")
    blocks = SearchSpace.build(resnet20, (X,), "stage>=2", "block")
    with pytest.raises(ValueError, match="converted in part"):
        blocks.mask_of({blocks.groups[0].sites[0]})
    with pytest.raises(ValueError, match="has 12 entries"):
        space.flop_ratio((True,))


def test_study_seeds_caches_and_records_failures(space, tmp_path):
    last = space.mask_of([n for n, s in space.sites.items() if s.stage == 3])
    failing = "".join("1" if m else "0" for m in last)
    evaluator = Synthetic(fail_on={failing})
    study = run_search(space, evaluator, SETTINGS, str(tmp_path / "s.journal"), "s", progress=False)
    trials = study.get_trials()
    assert len(trials) == 24
    assert trials[0].user_attrs["seed_point"] == "cnn" and trials[0].user_attrs["mask"] == "0" * 12
    assert trials[1].user_attrs["seed_point"] == "last" and trials[1].state == optuna.trial.TrialState.FAIL
    assert "out of memory" in trials[1].user_attrs["error"]
    assert trials[0].values == [0.8, 1.0]  # the CNN: its accuracy, FLOP ratio exactly 1
    assert len(evaluator.calls) == len(set(evaluator.calls))  # no mask evaluated twice...
    cached = [t for t in trials if "cached_from" in t.user_attrs]
    for t in cached:  # ...repeats are served from the study with the same values
        assert t.values == study.trials[t.user_attrs["cached_from"]].values
    assert fronts.summary(study)["failed"] == {1: trials[1].user_attrs["error"]}


def test_non_finite_results_fail_the_trial(space, tmp_path):
    evaluator = Synthetic(nan_on={"0" * 12})
    study = run_search(
        space, evaluator, SearchSettings(("accuracy",), trials=3), str(tmp_path / "s.journal"), "s", progress=False
    )
    assert study.trials[0].state == optuna.trial.TrialState.FAIL and "nan" in study.trials[0].user_attrs["error"]


def test_cost_constraints_prune_before_measuring(space, tmp_path):
    evaluator = Synthetic()
    settings = SearchSettings(("accuracy", "flop_ratio"), Constraints(max_flop_ratio=1.2), trials=20, population=8)
    study = run_search(space, evaluator, settings, str(tmp_path / "s.journal"), "s", progress=False)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.user_attrs["flop_ratio"] > 1.2 and "flop_ratio" in t.user_attrs["pruned"] for t in pruned)
    measured = {t.user_attrs["mask"] for t in pruned} & set(evaluator.calls)
    assert not measured  # no compute spent on a candidate the budget rules out
    assert all(t.values[1] <= 1.2 for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)


def test_impossible_budget_bad_storage_and_other_space_fail_before_compute(resnet20, space, tmp_path):
    with pytest.raises(ValueError, match="cannot be met"):
        SearchSettings(constraints=Constraints(max_latency_ratio=0.9))
    with pytest.raises(ValueError, match="cannot open the study storage"):
        load_study(space, SETTINGS, f"sqlite:///{tmp_path}/missing/dir/s.db", "s")
    storage = str(tmp_path / "s.journal")
    run_search(space, Synthetic(), SearchSettings(("accuracy",), trials=2), storage, "s", progress=False)
    other = SearchSpace.build(resnet20, (X,), "stage>=3", "site")
    with pytest.raises(ValueError, match="made for another search"):
        run_search(other, Synthetic(), SearchSettings(("accuracy",), trials=2), storage, "s", progress=False)
    with pytest.raises(ValueError, match="objectives"):
        SearchSettings(objectives=("top5",))


def test_rerunning_resumes_the_study(space, tmp_path):
    storage = str(tmp_path / "s.journal")
    run_search(space, Synthetic(), SETTINGS, storage, "s", progress=False)
    study = run_search(space, Synthetic(), SETTINGS, storage, "s", progress=False)
    assert len(study.trials) == 48 and [t.number for t in study.trials] == list(range(48))
    assert sum("seed_point" in t.user_attrs for t in study.trials) == 2  # seeded once


def test_two_workers_share_one_study(tmp_path):
    storage = tmp_path / "shared.journal"
    worker = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_search import Synthetic, SETTINGS\n"
        "from tcnn_fx.search import SearchSpace, run_search\n"
        "from tcnn_fx.specs import load_model\n"
        "space = SearchSpace.build(load_model('cifar:resnet20').eval(), (torch.zeros(1, 3, 32, 32),), 'stage>=2', 'site')\n"
        f"run_search(space, Synthetic(), SETTINGS, {str(storage)!r}, 'shared', progress=False)\n"
    )  # fmt: skip
    workers = [subprocess.Popen([sys.executable, "-c", worker], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for process in workers:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-2000:]
    study = optuna.load_study(study_name="shared", storage=tcnn_fx.search.open_storage(str(storage)))
    numbers = [t.number for t in study.trials]
    assert len(numbers) == 48 and sorted(numbers) == list(range(48))  # every trial run once, by one worker
    assert sum("seed_point" in t.user_attrs for t in study.trials) == 2


def test_a_worker_waits_for_the_study_description_and_stops_waiting_for_a_dead_one(space, tmp_path, monkeypatch):
    # Another worker created the study and is still describing it: this one must wait, not misread it.
    storage = str(tmp_path / "s.journal")
    created = optuna.create_study(study_name="s", storage=tcnn_fx.search.open_storage(storage),
                                  directions=["maximize", "minimize"])  # fmt: skip
    created.set_user_attr("space", space.signature)  # half described
    finish = threading.Timer(0.5, lambda: [created.set_user_attr(k, v) for k, v in {
        "objectives": list(SETTINGS.objectives), "base_policy": space.base_policy, "grouping": space.grouping,
        "spec": None, "groups": [[g.label, list(g.sites)] for g in space.groups]}.items()])  # fmt: skip
    finish.start()
    study = load_study(space, SETTINGS, storage, "s")
    finish.join()
    assert study.user_attrs["grouping"] == space.grouping
    optuna.create_study(study_name="dead", storage=tcnn_fx.search.open_storage(storage))
    monkeypatch.setattr(tcnn_fx.search.study, "STUDY_SETUP_TIMEOUT", 0.3)
    with pytest.raises(ValueError, match="'dead' .* never fully set up"):
        load_study(space, SETTINGS, storage, "dead")


def test_front_files_policies_replay_and_plot(resnet20, space, tmp_path):
    study = run_search(space, Synthetic(), SETTINGS, str(tmp_path / "s.journal"), "s", progress=False)
    rows = fronts.front(study)
    costs = [(-r["accuracy"], r["flop_ratio"]) for r in rows]
    assert all(
        not (a <= c and b <= d and (a, b) != (c, d)) for a, b in costs for c, d in costs
    )  # mutually non-dominated
    written = fronts.write(study, tmp_path / "out")
    data = json.loads(written["json"].read_text())
    assert [r["trial"] for r in data["front"]] == [r["trial"] for r in rows]
    assert written["csv"].read_text().splitlines()[0].startswith("trial,accuracy")
    for row in rows:
        policy = Policy.load(written["policies"] / f"trial_{row['trial']}.json")
        converted = tcnn_fx.report_of(tcnn_fx.rewrite(resnet20, policy, (X,))).converted
        assert sorted(converted) == sorted(row["sites"])
        assert tcnn_fx.report_of(tcnn_fx.rewrite(resnet20, policy, (X,))).flop_ratio == pytest.approx(row["flop_ratio"])
    fronts.plot(study, tmp_path / "front.png")
    assert (tmp_path / "front.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="no trial 999"):
        fronts.export_policy(study, 999, tmp_path / "x.json")


def test_hypervolume_and_pareto_mask():
    assert hypervolume([(0.9, 1.0)], (0.5, 2.0)) == pytest.approx(0.4)
    assert hypervolume([(0.9, 1.0), (0.7, 0.5), (0.6, 1.5)], (0.5, 2.0)) == pytest.approx(0.5 * 0.2 + 1.0 * 0.4)
    mask = pareto_mask(torch.tensor([[1.0, 1.0], [0.5, 2.0], [1.5, 1.5], [1.0, 1.0]]).numpy())
    assert mask.tolist() == [True, True, False, True]


def test_cli_search_with_the_fine_tune_proxy(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "data", {"train": 6, "val": 4}, size=32)
    out = tmp_path / "search"
    common = [
        "cifar:resnet20",
        "--num-classes",
        "3",
        "--out",
        str(out),
        "--base-policy",
        "stage>=3",
        "--group",
        "block",
    ]
    main(["search", *common, "--data", str(data), "--objectives", "accuracy,flop_ratio", "--trials", "5",
          "--accuracy", "proxy", "--proxy-images", "4", "--batch-size", "4", "--quiet", "--in-memory"])  # fmt: skip
    output = " ".join(capsys.readouterr().out.split())
    assert "3 block choices (8 candidates)" in output and "Pareto front" in output
    front = json.loads((out / "front.json").read_text())
    assert front["trials"] == 5 and front["front"] and (out / "front.png").exists()
    first = front["front"][0]["trial"]
    main(["search", *common, "--objectives", "accuracy,flop_ratio", "--export-policy", str(first),
          "--policy-out", str(tmp_path / "chosen.json")])  # fmt: skip
    assert Policy.load(tmp_path / "chosen.json").sites == tuple(front["front"][0]["sites"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the same study name for another space: refused before any compute
        main(["search", "cifar:resnet20", "--out", str(out), "--base-policy", "stage>=2", "--data", str(data),
              "--study", "cifar:resnet20|stage>=3|block", "--objectives", "accuracy,flop_ratio"])  # fmt: skip
    assert "made for another search" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["search", "cifar:resnet20", "--out", str(out), "--objectives", "accuracy,flop_ratio"])
    assert "pass --data" in " ".join(capsys.readouterr().err.split())


def test_candidate_latency_is_measured_against_the_cnn_and_the_cnn_is_itself(resnet20):
    from tcnn_fx.search.evaluate import CandidateEvaluator

    space = SearchSpace.build(resnet20, (X,), "stage>=3", "block")
    evaluator = CandidateEvaluator(resnet20, (X,), space, batch=2, rounds=3)
    assert evaluator((False, False, False), "latency_ratio") == 1.0  # nothing converted: the CNN, not measured
    assert evaluator((False, False, True), "latency_ratio") > 1.0  # an 8x8 block of attention costs more
    with pytest.raises(ValueError, match="needs training data"):
        evaluator((True, False, False), "accuracy")
