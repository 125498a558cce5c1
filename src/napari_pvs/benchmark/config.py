"""What decides a benchmark run: the queue strategies compared and the run's configuration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from napari_pvs.ranking import DEFAULT_NOISE_DECAY, STRATEGIES

#: Strategies only the benchmark runs, beside the patch strategies of the one patch registry
#: (``ranking.STRATEGIES``): ``candidates``, the annotator answers yes or no on the predicted
#: clusters the project proposes (``Project.candidates``) instead of painting patches.
BENCHMARK_ONLY = ("candidates",)
#: The default cost model (seconds of an annotator's time), written in --help and the README:
#: painting a 32^3 patch means checking and correcting 32 slices of a prefilled prediction at
#: about 3-4 s a slice (~2 min); a yes/no answer is one look at a cluster shown centred in
#: three planes and one key (~3 s; the next candidate is on screen within 200 ms).
SECONDS_PER_PATCH = 120.0
SECONDS_PER_ANSWER = 3.0


@dataclass(frozen=True)
class StrategySpec:
    """A queue strategy with optional ranking options, written ``NAME[:key=value...]``.

    Keys: ``noise`` (initial score-noise temperature), ``decay`` (its factor per round),
    ``share`` (``stratified``/``clasp``: share of picks with predicted PVS). Unset options are
    the strategy's own (``clasp``: noise 1 and share 2/3, ClaSP PE).
    """

    name: str
    noise: float | None = None
    noise_decay: float = DEFAULT_NOISE_DECAY
    foreground_share: float | None = None
    label: str = ""

    @property
    def product_defaults(self) -> bool:
        """True when ``Project.rank`` ranks exactly like this: no option given, and no noise
        schedule that needs the round index (``clasp``, ``default`` when it is clasp)."""
        from napari_pvs.ranking import resolve_strategy

        plain = self.noise is None and self.foreground_share is None
        return plain and resolve_strategy(self.name) != "clasp"

    @property
    def asks_candidates(self) -> bool:
        """True for ``candidates``: rounds of yes/no answers, not of reviewed patches."""
        return self.name == "candidates"


def parse_strategies(text: str | Sequence[str]) -> list[StrategySpec]:
    """``"bald,entropy,stratified:noise=1"`` (or a list of such items) -> specs, checked."""
    items = text.split(",") if isinstance(text, str) else list(text)
    keys = {"noise": "noise", "decay": "noise_decay", "share": "foreground_share"}
    specs = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, *options = item.split(":")
        if name not in STRATEGIES and name not in BENCHMARK_ONLY:
            raise ValueError(
                f"unknown strategy {name!r} in {item!r}; choose from "
                f"{', '.join((*STRATEGIES, *BENCHMARK_ONLY))} "
                "(options: NAME:noise=1:decay=0.5:share=0.67)"
            )
        if name in BENCHMARK_ONLY and options:
            raise ValueError(f"{name!r} takes no options (got {item!r}); write {name}")
        values: dict[str, float] = {}
        for option in options:
            key, _, value = option.partition("=")
            if key not in keys or not value:
                raise ValueError(
                    f"bad strategy option {option!r} in {item!r}; use noise=T, decay=D or share=F"
                )
            try:
                values[keys[key]] = float(value)
            except ValueError as exc:
                raise ValueError(f"strategy option {option!r} needs a number") from exc
        spec = StrategySpec(name, label=item, **values)
        noise = 0.0 if spec.noise is None else spec.noise
        share = 0.5 if spec.foreground_share is None else spec.foreground_share
        if noise < 0 or not 0 < spec.noise_decay <= 1 or not 0 <= share <= 1:
            raise ValueError(f"{item!r}: need noise >= 0, 0 < decay <= 1 and 0 <= share <= 1")
        specs.append(spec)
    if not specs:
        raise ValueError("no strategy given; e.g. --strategies bald,entropy,stratified,random")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"strategies repeat: {', '.join(labels)}")
    return specs


@dataclass
class BenchmarkConfig:
    """Everything that decides a benchmark run (written to ``summary.json``)."""

    strategies: list[StrategySpec]
    rounds: int = 5
    per_round: int = 8
    patch: int = 32
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    init: str = "default"  # "default", "scratch" or a checkpoint path
    # train the start model on the initial patches (label-limited budget) before round 1, so
    # round 0 is a model that has seen them, as nnActive's protocol starts; "scratch" always does
    tune_start: bool = False
    # retrain "start" (label-limited, the default): every round trains the start model on all
    # patches labelled so far for a budget of steps + steps_per_patch x training patches (at
    # most max_steps), validating every validate_every steps (None: budget / 8, at least 25)
    # and stopping after `patience` validations without a better Dice. retrain "current" (the
    # product's loop, step-limited): each round fine-tunes the current version `steps` steps.
    steps: int = 150
    batch_size: int = 2
    learning_rate: float = 3e-4
    retrain: str = "start"
    steps_per_patch: int = 10
    max_steps: int = 600
    patience: int = 3
    validate_every: int | None = None
    smooth: int = 3  # the convergence check reads a moving mean of this many validations
    initial: int = 4  # patches every strategy starts with (validation ones included)
    # how they are picked: "random", or "fg-random" so that the fixed validation patches hold
    # PVS (random small patches of sparse PVS can hold none: a validation Dice of 0 throughout)
    initial_strategy: str = "random"
    validation: int = 2  # of which fixed validation patches
    full_steps: int | None = None  # full supervision: default rounds * steps
    test_tta: int = 1  # mirrorings when scoring (the bundled rule says 4: slower)
    mc_samples: int = 8  # MC-dropout samples of project predictions (BALD needs them)
    crop: bool = True
    scratch_model: str = "cross_modal"
    scratch_config: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    modality: str | None = None
    # the candidates strategy: yes/no answers per round, and the cost model that puts answers
    # and patches on one axis of annotator-minutes
    answers_per_round: int = 25
    seconds_per_patch: float = SECONDS_PER_PATCH
    seconds_per_answer: float = SECONDS_PER_ANSWER

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.per_round < 1 or self.steps < 1:
            raise ValueError("rounds, per_round and steps must be at least 1")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.validation < 1:
            raise ValueError("need at least one validation patch (rounds validate on them)")
        if self.initial < 2 * self.validation:
            raise ValueError(
                f"initial ({self.initial}) must be at least twice validation "
                f"({self.validation}): half of the initial patches become validation patches"
            )
        if self.initial_strategy not in ("random", "fg-random"):
            raise ValueError(
                f"initial_strategy must be 'random' or 'fg-random', got {self.initial_strategy!r}"
            )
        if self.retrain not in ("current", "start"):
            raise ValueError(f"retrain must be 'current' or 'start', got {self.retrain!r}")
        if self.steps_per_patch < 0 or self.max_steps < 1 or self.patience < 1 or self.smooth < 1:
            raise ValueError("need steps_per_patch >= 0, max_steps, patience and smooth >= 1")
        if self.answers_per_round < 1:
            raise ValueError(f"answers_per_round must be at least 1, got {self.answers_per_round}")
        if not (self.seconds_per_patch > 0 and self.seconds_per_answer > 0):
            raise ValueError(
                "seconds_per_patch and seconds_per_answer must be positive (the cost model), got "
                f"{self.seconds_per_patch} and {self.seconds_per_answer}"
            )
        if self.full_steps is None and self.retrain == "current":
            self.full_steps = self.rounds * self.steps  # what the last round's model has had

    @property
    def patch_strategies(self) -> list[StrategySpec]:
        """The strategies that queue patches (the patch summary's); not ``candidates``."""
        return [s for s in self.strategies if not s.asks_candidates]

    def annotator_minutes(self, patches: int, answers: int = 0) -> float:
        """Annotator time of ``patches`` reviewed patches and ``answers`` yes/no answers under
        the cost model (``seconds_per_patch``, ``seconds_per_answer``)."""
        return (patches * self.seconds_per_patch + answers * self.seconds_per_answer) / 60

    def budget(self, train_patches: int) -> int:
        """Training steps of a round on ``train_patches`` (label-limited: grows with them,
        rounded up to whole validation intervals, as a round trains in those)."""
        if self.retrain == "current":
            return self.steps
        steps = max(1, min(self.max_steps, self.steps + self.steps_per_patch * train_patches))
        # Round up to a multiple the interval rule maps back to itself, so the round (which
        # trains whole intervals of validation_interval(budget)) trains exactly this budget:
        # 8 validations above 200 steps, else validations of 25 (or of --validate-every).
        unit = self.validate_every or (8 if steps > 8 * 25 else min(steps, 25))
        return -(-steps // unit) * unit

    def reference_budget(self, train_patches: int) -> int:
        """Steps of the full-supervision run: ``full_steps`` if given, else the same rule."""
        return int(self.full_steps) if self.full_steps is not None else self.budget(train_patches)

    def validation_interval(self, budget: int) -> int | None:
        """Steps between validations of a label-limited round (None: the round's default)."""
        if self.retrain == "current":
            return None
        return self.validate_every or max(1, min(budget, max(25, budget // 8)))
