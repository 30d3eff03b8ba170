"""What TST adds to a pretraining run, as one frozen type: `TSTSettings`.

Every way of asking for TST builds one: the `--tst-*` arguments of `nemo-tst pretrain` and of
the Bridge launcher (`settings_from_args`; the flags are generated from the fields), the `tst:`
section of a recipe, and a Megatron-Bridge recipe
(`nemo_tst.bridge.tst_phase_configs(cfg, TSTSettings(...))`). The plan of a run
(`nemo_tst.core.plan.TSTPlan`) carries it. It is checked once, when it is built; each
integration then says a bad value with its own names for the settings (`SettingNames`).
"""

import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from typing import Optional

from nemo_tst.superposition.config import Mode, SettingError, SuperpositionConfig, Weighting

__all__ = [
    "SETTINGS", "SETTING_FLAG", "SettingError", "SettingNames", "TSTSettings", "add_setting_arguments",
    "setting_flag", "settings_argv", "settings_from_args",
]

DEFAULT_PHASE1_FRACTION = 0.3


def _setting(help: str, default=MISSING):
    """A `TSTSettings` field. `help` documents it, and is the help of its command-line flag: a
    template over setting names (`{phase1_iters}`) that each integration spells its own way
    (`SettingNames`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True)
class TSTSettings:
    """Token superposition: phase 1 trains on bags of s tokens for the first r of the steps.

    Everything else keeps its meaning in the trainer: the sequence length is L (latent
    positions in phase 1, tokens in phase 2), the iteration count N spans both phases, and
    the global batch counts samples of either phase.

    The fields are the one list of settings: the `--tst-*` flags of both launchers (name, type,
    help: `add_setting_arguments`), the names each integration uses in its errors (`SettingNames`), the `tst:`
    keys of a recipe and the identity a rerun must match (`run_dir.settings_identity`) are all
    read from them."""

    bag_size: int = _setting(
        "s: tokens averaged into one latent position in phase 1 (paper: 6 dense, 16 MoE); 1 is "
        "ordinary training (the baseline), through the same code. Required.")
    phase1_fraction: Optional[float] = _setting(
        "r: the fraction of the N iterations spent in phase 1 (paper: 0.2-0.4); n1 = round(r N); "
        "default 0.3 when {phase1_iters} is not given either (giving both is refused).", None)
    phase1_iters: Optional[int] = _setting(
        "n1, phase 1's iterations, instead of {phase1_fraction}.", None)
    mode: Mode = _setting(
        "full (the method), or the paper's input_only / output_only ablations.", "full")
    weighting: Weighting = _setting(
        "How the s targets of a latent position share its loss: uniform, power, exp, first.",
        "uniform")
    target_weights: Optional[tuple[float, ...]] = _setting(
        "Explicit weights of the s targets (normalised to sum 1); overrides {weighting}.", None)
    mask_cross_document_targets: bool = _setting(
        "Mask a target in a later document than the bag's last token (needs the tokenizer's "
        "end-of-document id).", False)

    def __post_init__(self):
        if self.target_weights is not None:
            object.__setattr__(self, "target_weights", tuple(float(w) for w in self.target_weights))
        self.superposition  # noqa: B018 -- builds and checks the phase-1 config now
        if self.phase1_iters is not None and self.phase1_fraction is not None:
            raise SettingError(
                "phase1_iters", "{phase1_iters}={value} and {phase1_fraction}=%r both set phase "
                "1's length; give one of them" % (self.phase1_fraction,), value=self.phase1_iters,
            )
        if self.phase1_iters is None and self.phase1_fraction is None:
            object.__setattr__(self, "phase1_fraction", DEFAULT_PHASE1_FRACTION)
        if self.phase1_iters is None:
            r = self.phase1_fraction
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 0.0 < r < 1.0):
                raise SettingError(
                    "phase1_fraction", "{phase1_fraction}={value!r} must lie strictly between 0 "
                    "and 1 (paper: 0.2-0.4), or give {phase1_iters} instead", value=r,
                )
        else:
            n1 = self.phase1_iters
            if isinstance(n1, bool) or not isinstance(n1, int) or n1 < 1:
                raise SettingError(
                    "phase1_iters", "{phase1_iters}={value!r} must be a whole number >= 1 (and "
                    "below {train_iters}); phase 1 of 0 steps is ordinary training", value=n1,
                )

    @cached_property
    def superposition(self) -> SuperpositionConfig:
        """What phase 1 does, for the math (`nemo_tst.superposition`)."""
        return SuperpositionConfig(
            bag_size=self.bag_size,
            mode=self.mode,
            weighting=self.weighting,
            target_weights=self.target_weights,
            mask_cross_document_targets=self.mask_cross_document_targets,
        )

    def phase1_iterations(self, train_iters: int) -> int:
        """n1 for a run of N = `train_iters`: phase1_iters when given, else r N rounded to the
        nearest iteration (every integration uses this, so a recipe gives the same boundary
        through each)."""
        if self.phase1_iters is not None:
            return self.phase1_iters
        return int(round(self.phase1_fraction * train_iters))


SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(TSTSettings))
"""The names of the TST settings, in their declaration order."""


@dataclass(frozen=True, kw_only=True)
class SettingNames:
    """How an integration spells the settings its users write, for the errors that name them:
    each TST setting through the `setting` pattern (so a new one is spelled everywhere), and
    the trainer settings the shared checks name too. `names.bag_size` is the spelling of one."""

    setting: str
    """The spelling of a TST setting: a pattern over `{name}` (`bag_size`) and `{dashed}`
    (`bag-size`), e.g. `--tst-{dashed}` or `TSTSettings.{name}`."""
    train_iters: str
    seq_length: str
    tensor_parallel: str
    sequence_parallel: str
    context_parallel: str
    decay_iters: str
    wsd_decay_iters: str
    mtp_num_layers: str
    run_dir: str

    def spell(self, name: str) -> str:
        """How this integration spells the TST setting `name`."""
        return _spelled(self.setting, name)

    def settings_named(self) -> dict[str, str]:
        """Every TST setting and its spelling here."""
        return {name: self.spell(name) for name in SETTINGS}

    def __getattr__(self, name: str) -> str:
        # Reached only for names that are not fields above: the TST settings.
        if name in SETTINGS:
            return self.spell(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def _spelled(pattern: str, name: str) -> str:
    if name not in SETTINGS:
        raise KeyError(f"{name!r} is not a TST setting; they are {', '.join(SETTINGS)}")
    return pattern.format(name=name, dashed=name.replace("_", "-"))


# ---------------------------------------------------------------------------------------------
# The settings on a command line: both launchers (`nemo-tst pretrain`, `nemo_tst.bridge.cli`)
# take each as a `--tst-*` flag generated from its field.
# ---------------------------------------------------------------------------------------------

SETTING_FLAG = "--tst-{dashed}"
"""The command-line flag of a TST setting (`bag_size`: `--tst-bag-size`)."""


def setting_flag(name: str) -> str:
    return _spelled(SETTING_FLAG, name)


def add_setting_arguments(group, names: "SettingNames") -> None:
    """A flag for each `TSTSettings` field in the argparse parser or group `group`: its type (a
    `Literal` gives the choices, a tuple takes one or more values, a bool is a switch), its
    default, and its help (spelling the other settings as `names` does)."""
    hints = typing.get_type_hints(TSTSettings)
    for setting in fields(TSTSettings):
        kind = hints[setting.name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        default = None if setting.default is MISSING else setting.default
        keywords = {"help": setting.metadata["help"].format_map(names.settings_named()), "default": default}
        if kind is bool:
            if default:
                raise TypeError(f"TSTSettings.{setting.name}: a switch must default to False")
            keywords["action"] = "store_true"
        elif typing.get_origin(kind) is typing.Literal:
            keywords["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is tuple:
            keywords |= {"type": typing.get_args(kind)[0], "nargs": "+"}
        else:
            keywords["type"] = kind
        group.add_argument(setting_flag(setting.name), **keywords)


def settings_from_args(args, names: "SettingNames") -> TSTSettings:
    """The `TSTSettings` the flags of `add_setting_arguments` ask for, parsed into `args`; a
    missing or bad value raises ValueError naming the setting as `names` spells it."""
    given = {}
    for setting in fields(TSTSettings):
        value = getattr(args, setting_flag(setting.name).removeprefix("--").replace("-", "_"))
        if value is None and setting.default is MISSING:
            help_text = setting.metadata["help"].format_map(names.settings_named())
            raise ValueError(f"{names.spell(setting.name)} is required ({help_text})")
        if value is not None:
            given[setting.name] = value
    try:
        return TSTSettings(**given)
    except SettingError as err:
        raise ValueError(err.named(names)) from None


def settings_argv(settings: TSTSettings) -> list[str]:
    """The flags that ask for `settings` (`settings_from_args` reads them back)."""
    argv = []
    for setting in fields(TSTSettings):
        value = getattr(settings, setting.name)
        if value is None or value is False:
            continue
        argv.append(setting_flag(setting.name))
        if isinstance(value, tuple):
            argv += [str(v) for v in value]
        elif value is not True:
            argv.append(str(value))
    return argv
