"""What phase 1 does, as one keyword-only config.

Phase 1 (superposition) has two independent halves, and the paper ablates each:

- input: the transformer sees the mean embedding of each bag of `bag_size` contiguous tokens;
- output: each latent position predicts the k tokens that follow it (multi-hot CE).

`mode` picks both ("full", the method), only the input ("input_only": averaged input, each
latent position predicts the single token after its bag) or only the output ("output_only":
ordinary token input, each position predicts the next `bag_size` tokens). Phase 2 is ordinary
next-token training and has no config here: a model with no superposition config is vanilla.
"""

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

Mode = Literal["full", "input_only", "output_only"]
Weighting = Literal["uniform", "power", "exp", "first"]

MODES = ("full", "input_only", "output_only")
WEIGHTINGS = ("uniform", "power", "exp", "first")


class SettingError(ValueError):
    """A setting that cannot be: `setting` is the field it concerns.

    The message is a template over setting names (`{bag_size}`, `{phase1_fraction}`, ...) and
    `{value}`: `str()` spells the settings as the dataclass fields are called, `named(names)`
    as an integration spells them (`--tst-bag-size`, `cfg.train.train_iters`), so one check
    serves the Python API, the CLI and a Bridge recipe with the names each user wrote."""

    def __init__(self, setting: str, template: str, **values):
        self.setting, self.template, self.values = setting, template, values
        super().__init__(self.named(None))

    def named(self, names=None) -> str:
        """The message with each `{name}` spelt as `names` (an object or dict) spells it."""

        class Spelling(dict):
            def __missing__(self, key):
                if isinstance(names, dict):
                    return names.get(key, key)
                return getattr(names, key, key) if names is not None else key

        return self.template.format_map(Spelling(self.values))


@dataclass(frozen=True, kw_only=True)
class SuperpositionConfig:
    bag_size: int
    """s: tokens per bag. The data sequence of phase 1 is s*L tokens for L latent positions.
    s=1 is ordinary next-token training, through the same code."""

    mode: Mode = "full"
    """"full" (averaged input and multi-hot targets), "input_only" or "output_only"."""

    weighting: Weighting = "uniform"
    """How the k targets of a latent position share its unit of loss (paper, appendix D):
    "uniform" 1/k (the paper's default, best at s=4), "power" proportional to 1/i (better at
    s>=8), "exp" proportional to exp(-i), "first" all on the next token. i = 1..k."""

    target_weights: Optional[Sequence[float]] = field(default=None)
    """Explicit weights for the k targets (normalised to sum 1); overrides `weighting`."""

    mask_cross_document_targets: bool = False
    """False (default): targets are kept across an end-of-document token, as Megatron's
    packed pretraining does for ordinary next-token targets. True: a target is masked when an
    end-of-document token lies between the bag's last input token and that target (the
    target belongs to a later document than the bag ends in)."""

    def __post_init__(self):
        if isinstance(self.bag_size, bool) or not isinstance(self.bag_size, int):
            raise SettingError(
                "bag_size", "{bag_size} (s) must be an integer >= 1, got {value!r}: a whole "
                "number such as 4", value=self.bag_size,
            )
        if self.bag_size < 1:
            raise SettingError(
                "bag_size", "{bag_size} (s) must be >= 1, got {value}: s=1 is ordinary "
                "training, the paper uses s=6 (dense) and s=16 (MoE)", value=self.bag_size,
            )
        if self.mode not in MODES:
            raise SettingError("mode", "{mode} must be one of %s, got {value!r}" % (MODES,), value=self.mode)
        if self.target_weights is None:
            if self.weighting not in WEIGHTINGS:
                raise SettingError(
                    "weighting", "{weighting} must be one of %s (or give {target_weights}), got "
                    "{value!r}" % (WEIGHTINGS,), value=self.weighting,
                )
        else:
            weights = list(self.target_weights)
            if len(weights) != self.num_targets:
                raise SettingError(
                    "target_weights", "{target_weights} has {value} entries but {mode}=%r with "
                    "{bag_size}=%d has %d targets per position"
                    % (self.mode, self.bag_size, self.num_targets), value=len(weights),
                )
            if any((not math.isfinite(w)) or w < 0 for w in weights) or sum(weights) <= 0:
                raise SettingError(
                    "target_weights", "{target_weights} must be finite, >= 0 and not all 0, got "
                    "{value}", value=weights,
                )

    @property
    def input_bag_size(self) -> int:
        """Tokens averaged into one latent position (1 when the input is not superposed)."""
        return 1 if self.mode == "output_only" else self.bag_size

    @property
    def num_targets(self) -> int:
        """k: targets per latent position (1 when the output is not multi-hot)."""
        return 1 if self.mode == "input_only" else self.bag_size

    def weights(self) -> list[float]:
        """The k target weights, summing to 1."""
        k = self.num_targets
        if self.target_weights is not None:
            raw = [float(w) for w in self.target_weights]
        elif self.weighting == "uniform":
            raw = [1.0] * k
        elif self.weighting == "power":
            raw = [1.0 / i for i in range(1, k + 1)]
        elif self.weighting == "exp":
            raw = [math.exp(-i) for i in range(1, k + 1)]
        elif self.weighting == "first":
            raw = [1.0] + [0.0] * (k - 1)
        else:  # unreachable: validated in __post_init__
            raise AssertionError(self.weighting)
        total = sum(raw)
        return [w / total for w in raw]

    def sample_length(self, num_latent_positions: int) -> int:
        """Data tokens one phase-1 sample needs for L latent positions: the inputs of the L
        positions and the k targets of the last one (full: s*L + s, input_only: s*L + 1,
        output_only: L + s; s=1 gives L + 1, Megatron's ordinary sample)."""
        return num_latent_positions * self.input_bag_size + self.num_targets

    def text_tokens_per_sample(self, num_latent_positions: int) -> int:
        """Fresh text one sample trains on (the next sample starts after these tokens)."""
        return num_latent_positions * self.input_bag_size
