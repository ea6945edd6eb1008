"""The Optuna side of `compress auto`: its settings, the storage several processes share, the study and its
sampler."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from compress.errors import ConfigError, first_line

OBJECTIVES = ("size", "latency", "both")
STUDY_PREFIX = "compress-auto-"
HEARTBEAT_SECONDS = 10  # a RUNNING trial silent for GRACE_SECONDS (a killed process) is marked FAIL and retried
GRACE_SECONDS = 60
MAX_RETRY = 2
POPULATION = 10  # NSGA-II generation size: searches here run tens of trials, not thousands
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class AutoConfig:
    max_drop: float  # accuracy points (of 100) the chosen file may lose against the model on the validation split
    objective: str = "size"  # what `best` minimizes within the budget: gzip bytes, batch-1 latency or their product
    trials: int = 20  # the study's total: a rerun with more continues, several processes together reach it
    time_budget: float | None = None  # minutes for this process; no trial starts after it
    storage: str | None = None  # an Optuna storage URL; default sqlite:///OUT/study.db
    quick: bool = False  # one epoch per stage and short latency timing
    seed: int | None = None  # the sampler's: a search that repeats itself; unset where processes share a study

    def __post_init__(self):
        if not isinstance(self.max_drop, (int, float)) or not 0 <= self.max_drop <= 100:
            raise ConfigError(f"--max-drop must be accuracy points from 0 to 100, got {self.max_drop!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not isinstance(self.trials, int) or not 1 <= self.trials <= MAX_TRIALS:
            raise ConfigError(f"--trials must be an integer from 1 to {MAX_TRIALS:,}, got {self.trials!r}")
        if self.time_budget is not None and not 0 < self.time_budget < math.inf:
            raise ConfigError(f"--time-budget must be a positive number of minutes, got {self.time_budget!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"--sampler-seed must be an integer, got {self.seed!r}")

    def directions(self) -> list[str]:
        """Validation accuracy up; gzip bytes and/or batch-1 latency down."""
        return ["maximize", *(["minimize"] * (2 if self.objective == "both" else 1))]


def open_study(config: AutoConfig, url: str, name: str):
    """The study `name` in `url` (made or continued); a storage that holds another compress-auto study is refused."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is said in one line of ours, no traceback
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5: said once here, not per run
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(MAX_RETRY))
        names = optuna.study.get_all_study_names(storage)
    except Exception as exc:  # sqlalchemy's many errors (bad URL, no driver, unreachable) all mean "cannot use it"
        raise ConfigError(f"--storage {url}: cannot open it: {first_line(exc, 120)}") from None
    others = [other for other in names if other.startswith(STUDY_PREFIX) and other != name]
    if others:
        raise ConfigError(f"--storage {url} holds the study {others[0]} of another model, data, setting "
                          "(max-drop, objective, quick) or search space (another compress version's); use another "
                          "--out or --storage")
    sampler = optuna.samplers.NSGAIISampler(population_size=POPULATION, seed=config.seed)
    return optuna.create_study(storage=storage, study_name=name, directions=config.directions(), sampler=sampler,
                               load_if_exists=True)


def counted_trials(study) -> int:
    """Trials that count towards --trials: all but failed ones, whose retries (queued as WAITING) count instead."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                        TrialState.WAITING, TrialState.PRUNED)))


def study_is_done(study, trials: int) -> bool:
    """--trials reached and no trial queued: queued ones (the first trials, retries) count and still have to run."""
    from optuna.trial import TrialState

    return counted_trials(study) >= trials and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def finished_trials(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
