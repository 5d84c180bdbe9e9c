"""Multi-objective search over a ``SearchSpace`` with Optuna: storage, resume, workers, caching, failures.

The study lives in an Optuna storage (a journal file by default, any RDB URL
otherwise), so rerunning the same command resumes it and several processes,
on one machine or many, can work on it: Optuna hands each worker its own
trials.  The study records the space it was made for and refuses another.

Each trial samples one mask.  Exact costs (FLOP and parameter ratios) come
first and free; a mask breaking a cost constraint is pruned before anything
is measured.  A mask already evaluated in the study is not evaluated again:
its values are copied (``cached_from``).  A candidate that fails (export
error, out of memory, a diverging fine-tune) is recorded as failed with its
reason, and the search goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import optuna
from tqdm.auto import tqdm

from tcnn_fx.errors import DivergenceError, InvalidInputError
from tcnn_fx.search.space import SearchSpace

#: objective name -> direction.  accuracy is measured; the ratios are hybrid / CNN.
OBJECTIVES = {"accuracy": "maximize", "latency_ratio": "minimize", "flop_ratio": "minimize", "param_ratio": "minimize"}
SAMPLERS = ("nsga2", "tpe")
#: Seconds a worker waits for the worker that created a study to finish describing it.
STUDY_SETUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Constraints:
    """Upper bounds on the hybrid / CNN ratios (None: unbounded)."""

    max_flop_ratio: float | None = None
    max_param_ratio: float | None = None
    max_latency_ratio: float | None = None

    def check(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 1.0:
                raise InvalidInputError(
                    f"{name.replace('_', '-')} {value} cannot be met: no candidate, not even the unconverted CNN "
                    f"(ratio 1.0), is below it"
                )

    def violated(self, values: dict[str, float]) -> str | None:
        for name, limit in vars(self).items():
            measured = values.get(name.removeprefix("max_"))
            if limit is not None and measured is not None and measured > limit:
                return f"{name.removeprefix('max_')} {measured:.3f} > {limit}"
        return None


@dataclass
class SearchSettings:
    objectives: tuple[str, ...] = ("accuracy", "latency_ratio")
    constraints: Constraints = field(default_factory=Constraints)
    sampler: str = "tpe"
    trials: int = 50
    seed: int = 0
    population: int = 16

    def __post_init__(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives:
            raise InvalidInputError(f"objectives must be among {list(OBJECTIVES)}, got {list(self.objectives)}")
        if self.sampler not in SAMPLERS:
            raise InvalidInputError(f"sampler must be one of {SAMPLERS}, not {self.sampler!r}")
        self.constraints.check()


#: Measures one objective ("latency_ratio" or "accuracy") of one mask; exact costs are computed here.
Evaluator = Callable[[tuple[bool, ...], str], float]
#: Measured objectives, cheapest first: a latency constraint is checked before any fine-tuning.
MEASURED = ("latency_ratio", "accuracy")


def open_storage(storage: str) -> optuna.storages.BaseStorage:
    """A journal file (any path) or an Optuna RDB URL (``sqlite:///...``, ``postgresql://...``)."""
    try:
        if "://" in storage:
            return optuna.storages.RDBStorage(storage)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(storage))
    except Exception as error:  # an unusable storage, whatever the backend says: fail before any compute
        raise InvalidInputError(f"cannot open the study storage {storage!r}: {error}") from error


def _sampler(settings: SearchSettings) -> optuna.samplers.BaseSampler:
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=settings.population, seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, constant_liar=True)


def _mask_key(mask: tuple[bool, ...]) -> str:
    return "".join("1" if on else "0" for on in mask)


def load_study(
    space: SearchSpace, settings: SearchSettings, storage: str, name: str, spec: str | None = None
) -> optuna.Study:
    """Create the study, or open it if it exists and was made for this space and these objectives.

    Workers may start together on one storage: exactly one creates the study
    (the storage decides) and describes it, writing ``groups`` last; the others
    wait for that before comparing, so none sees a half-written description.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours; Optuna's INFO lines repeat it
    backend = open_storage(storage)
    sampler = _sampler(settings)
    identity = {"space": space.signature, "objectives": list(settings.objectives), "base_policy": space.base_policy,
                "grouping": space.grouping, "spec": spec}  # fmt: skip
    try:
        study = optuna.create_study(study_name=name, storage=backend, sampler=sampler,
                                    directions=[OBJECTIVES[o] for o in settings.objectives])  # fmt: skip
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=backend, sampler=sampler)
    else:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.enqueue_trial({f"g{i}": False for i in range(len(space.groups))}, user_attrs={"seed_point": "cnn"})
        last = _last_stage_mask(space)
        if last is not None and any(last):
            study.enqueue_trial({f"g{i}": on for i, on in enumerate(last)}, user_attrs={"seed_point": "last"})
        study.set_user_attr("groups", [[g.label, list(g.sites)] for g in space.groups])
        return study
    stored = _described(study, name, storage)
    different = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
    if different:
        raise InvalidInputError(f"study {name!r} in {storage} was made for another search: {different} (stored, asked); "
                         "choose another --study name or storage")  # fmt: skip
    return study


def _described(study: optuna.Study, name: str, storage: str) -> dict:
    """The study's description, once the worker that created it has written all of it (``groups`` last)."""
    deadline = time.monotonic() + STUDY_SETUP_TIMEOUT
    while "groups" not in (attrs := study.user_attrs):
        if time.monotonic() > deadline:
            raise InvalidInputError(
                f"study {name!r} in {storage} exists but was never fully set up (its creating worker stopped "
                f"within {STUDY_SETUP_TIMEOUT:.0f} s?); delete it or choose another --study name"
            )
        time.sleep(0.1)
    return attrs


def _last_stage_mask(space: SearchSpace) -> tuple[bool, ...] | None:
    """The paper's choice: every site of the deepest stage (None if the grouping splits it)."""
    last = max(site.stage for site in space.sites.values())
    names = {n for n, site in space.sites.items() if site.stage == last}
    try:
        return space.mask_of(names)
    except ValueError:
        return None


def run_search(
    space: SearchSpace, evaluate: Evaluator, settings: SearchSettings, storage: str, name: str, *,
    spec: str | None = None, progress: bool = True,
) -> optuna.Study:  # fmt: skip
    """Run ``settings.trials`` more trials of the study ``name`` in ``storage`` (created or resumed)."""
    study = load_study(space, settings, storage, name, spec)
    measured = {o for o in settings.objectives if o in ("accuracy", "latency_ratio")}
    if settings.constraints.max_latency_ratio is not None:
        measured.add("latency_ratio")

    def objective(trial: optuna.Trial) -> list[float]:
        mask = tuple(trial.suggest_categorical(f"g{i}", [False, True]) for i in range(len(space.groups)))
        key = _mask_key(mask)
        trial.set_user_attr("mask", key)
        values = {"flop_ratio": space.flop_ratio(mask), "param_ratio": space.param_ratio(mask)}
        reason = settings.constraints.violated(values)
        if reason is None:
            previous = _completed_with(study, key, trial.number)
            if previous is not None:
                trial.set_user_attr("cached_from", previous.number)
                values |= {k: previous.user_attrs[k] for k in measured if k in previous.user_attrs}
            else:
                for objective_name in (m for m in MEASURED if m in measured):
                    values[objective_name] = _measure(evaluate, mask, objective_name, trial)
                    reason = settings.constraints.violated(values)
                    if reason is not None:
                        break
            reason = settings.constraints.violated(values)
        for k, v in values.items():
            trial.set_user_attr(k, v)
        if reason is not None:
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)
        return [values[o] for o in settings.objectives]

    bar = tqdm(total=settings.trials, desc="search", disable=not progress)

    signs = np.array([-1.0 if OBJECTIVES[o] == "maximize" else 1.0 for o in settings.objectives])

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not progress:
            return
        bar.update(1)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        front = pareto_mask(np.array([t.values for t in done]) * signs).sum() if done else 0
        bar.set_postfix(complete=len(done), front=int(front), last=trial.state.name.lower())

    try:
        study.optimize(objective, n_trials=settings.trials, catch=(Exception,), callbacks=[report])
    finally:
        bar.close()
    return study


def pareto_mask(costs: np.ndarray) -> np.ndarray:
    """Which rows of ``costs`` (n, objectives; lower is better) no other row dominates."""
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(-1)
    better = (costs[:, None, :] < costs[None, :, :]).any(-1)
    dominated = (no_worse & better).any(0)
    return ~dominated


def _measure(evaluate: Evaluator, mask: tuple[bool, ...], name: str, trial: optuna.Trial) -> float:
    """One measurement; a failure or a non-finite value is recorded on the trial and fails it."""
    try:
        value = float(evaluate(mask, name))
    except Exception as error:  # recorded with its reason; the study goes on (optimize catches it)
        trial.set_user_attr("error", f"{name}: {type(error).__name__}: {error}"[:500])
        raise
    if not math.isfinite(value):
        trial.set_user_attr("error", f"{name} is {value}")
        raise DivergenceError(f"candidate {_mask_key(mask)}: {name} is {value}")
    return value


def _completed_with(study: optuna.Study, key: str, number: int) -> optuna.trial.FrozenTrial | None:
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if trial.user_attrs.get("mask") == key and trial.number != number:
            return trial
    return None
