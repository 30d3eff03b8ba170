"""One TST settings type: the CLI, the recipes, the Bridge adapter and the plan all carry
`TSTSettings`, every setting reaches each of them, and a bad value is named as each user
wrote it. And the layering: the core imports no trainer, neither adapter imports the other."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_tst.core.settings import SettingError, TSTSettings

ROOT = Path(__file__).resolve().parents[1]

# A value other than the default for every setting (phase1_fraction and phase1_iters are two
# ways to give one thing: never both in one TSTSettings).
NON_DEFAULT = dict(bag_size=3, phase1_fraction=0.25, phase1_iters=7, mode="output_only",
                   weighting="power", target_weights=(3.0, 2.0, 1.0), mask_cross_document_targets=True)


def test_every_setting_has_a_non_default_value_here():
    names = {f.name for f in dataclasses.fields(TSTSettings)}
    assert set(NON_DEFAULT) == names, "a new TST setting: add it to NON_DEFAULT (and check it reaches every integration)"


def _megatron_args(argv):
    from nemo_tst.training.arguments import parse_megatron_args

    return parse_megatron_args(argv)


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_cli_arguments_carry_every_setting(name):
    """Through `nemo-tst pretrain`'s flags and through the Bridge launcher's."""
    from nemo_tst.bridge import cli as bridge_cli
    from nemo_tst.core.settings import settings_argv, settings_from_args
    from nemo_tst.training.arguments import MEGATRON_NAMES

    values = {"bag_size": 3} | {name: NON_DEFAULT[name]}
    if name == "target_weights":
        values["mode"] = "full"
    settings = TSTSettings(**values)
    assert settings_from_args(_megatron_args(settings_argv(settings)), MEGATRON_NAMES) == settings
    # (Overrides first: a --tst-target-weights list would take the words after it.)
    launched, overrides = bridge_cli.parse_args(["--recipe", "r", "train.train_iters=9", *settings_argv(settings)])
    assert settings_from_args(launched, bridge_cli.LAUNCHER_NAMES) == settings
    assert overrides == ["train.train_iters=9"]


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_recipes_expose_every_setting(name):
    from nemo_tst.recipes.catalog import load_recipe

    value = NON_DEFAULT[name]
    text = "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value).lower() \
        if isinstance(value, bool) else str(value)
    overrides = (["tst.bag_size=3"] if name == "target_weights" else []) + [f"tst.{name}={text}"]
    recipe = load_recipe("tst_tiny", gpus=1, overrides=overrides)
    assert isinstance(recipe.tst, TSTSettings) and getattr(recipe.tst, name) == value
    # ... and what the recipe launches asks for the same settings.
    from nemo_tst.core.settings import settings_from_args
    from nemo_tst.training.arguments import MEGATRON_NAMES

    assert settings_from_args(_megatron_args(recipe.megatron_args()), MEGATRON_NAMES) == recipe.tst


def test_bridge_and_plan_carry_the_same_type():
    import nemo_tst.bridge as bridge
    from nemo_tst.training.arguments import plan_from_args

    assert bridge.TSTSettings is TSTSettings
    settings = TSTSettings(**(NON_DEFAULT | {"phase1_fraction": None}))  # not both: see TSTSettings
    plan = bridge.plan_tst_run(settings, run_dir="/ckpt/x", train_iters=20, global_batch_size=4, seq_length=8)
    assert plan.settings is settings and plan.phase1_iters == 7
    from nemo_tst.recipes.catalog import load_recipe

    args = _megatron_args(load_recipe("tst_tiny", overrides=["tst.bag_size=3"]).megatron_args())
    assert isinstance(plan_from_args(args).settings, TSTSettings) and plan_from_args(args).settings.bag_size == 3


@pytest.mark.parametrize("values, field, spelled", [
    (dict(bag_size=0), "bag_size", {"megatron": "--tst-bag-size", "bridge": "TSTSettings.bag_size"}),
    (dict(bag_size=4, phase1_fraction=1.5), "phase1_fraction",
     {"megatron": "--tst-phase1-fraction=1.5", "bridge": "TSTSettings.phase1_fraction=1.5"}),
    (dict(bag_size=4, target_weights=[1, 2]), "target_weights",
     {"megatron": "--tst-target-weights has 2 entries", "bridge": "TSTSettings.target_weights has 2"}),
    (dict(bag_size=4, weighting="linear"), "weighting", {"megatron": "--tst-weighting must be one of"}),
])
def test_a_bad_setting_is_named_as_each_integration_spells_it(values, field, spelled):
    from nemo_tst.bridge import BRIDGE_NAMES
    from nemo_tst.training.arguments import MEGATRON_NAMES

    with pytest.raises(SettingError) as info:
        TSTSettings(**values)
    assert info.value.setting == field and str(info.value).startswith(field)
    names = {"megatron": MEGATRON_NAMES, "bridge": BRIDGE_NAMES}
    for integration, words in spelled.items():
        assert words in info.value.named(names[integration])


def test_phase1_length_is_given_one_way():
    from nemo_tst.core.settings import settings_from_args
    from nemo_tst.training.arguments import MEGATRON_NAMES

    assert TSTSettings(bag_size=4).phase1_fraction == 0.3  # the default when neither is given
    with pytest.raises(ValueError, match="--tst-phase1-iters=5 and --tst-phase1-fraction=0.2 both set"):
        settings_from_args(_megatron_args(["--tst-bag-size", "4", "--tst-phase1-iters", "5",
                                           "--tst-phase1-fraction", "0.2"]), MEGATRON_NAMES)
    assert MEGATRON_NAMES.phase1_iters == "--tst-phase1-iters"


def test_run_identity_holds_every_setting():
    """A rerun with any TST setting changed is another run (`run_dir.check_run_directory`)."""
    from nemo_tst.core.plan import TSTPlan
    from nemo_tst.core.run_dir import settings_identity

    settings = TSTSettings(bag_size=3)
    plan = TSTPlan(settings=settings, seq_length=8, global_batch_size=4, train_iters=20, phase1_iters=6)
    identity = settings_identity(settings, plan)
    for f in dataclasses.fields(TSTSettings):
        if f.name in ("phase1_fraction", "phase1_iters"):
            assert identity["phase1_iters"] == 6  # both spell phase 1's length: n1 is what counts
        else:
            assert f"tst_{f.name}" in identity, f"{f.name} is not part of the run's identity"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TSTSettings)])
def test_every_setting_has_a_flag_a_help_and_a_name_in_each_integration(name):
    """The `--tst-*` flags (with their help) and each integration's names for the settings are
    read from `TSTSettings`' fields: a new field is on every surface, or this fails (the round
    trip through the flags and the run identity are checked above)."""
    import argparse

    from nemo_tst.bridge import BRIDGE_NAMES
    from nemo_tst.recipes.catalog import RECIPE_NAMES
    from nemo_tst.core.settings import setting_flag
    from nemo_tst.training.arguments import MEGATRON_NAMES, add_tst_arguments

    setting = next(f for f in dataclasses.fields(TSTSettings) if f.name == name)
    flag = "--tst-" + name.replace("_", "-")
    assert setting_flag(name) == MEGATRON_NAMES.spell(name) == getattr(MEGATRON_NAMES, name) == flag
    assert BRIDGE_NAMES.spell(name) == f"TSTSettings.{name}" and RECIPE_NAMES[name] == f"tst.{name}"
    help_text = setting.metadata["help"].format_map(MEGATRON_NAMES.settings_named())
    assert len(help_text) > 20 and "{" not in help_text
    option = add_tst_arguments(argparse.ArgumentParser())._option_string_actions[flag]
    assert option.help == help_text and option.dest == flag[2:].replace("-", "_")


def test_only_settings_are_spelled_as_settings():
    from nemo_tst.training.arguments import MEGATRON_NAMES

    with pytest.raises(KeyError, match="'bag_sise' is not a TST setting"):
        MEGATRON_NAMES.spell("bag_sise")
    with pytest.raises(AttributeError):
        MEGATRON_NAMES.bag_sise  # noqa: B018
    assert MEGATRON_NAMES.train_iters == "--train-iters"  # the trainer's own settings, as given


def test_settings_are_frozen():
    settings = TSTSettings(bag_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.bag_size = 2


LAYERS = r"""
import sys, importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.startswith(("megatron.training", "megatron.bridge", "nemo_tst.")))
print("\n".join(loaded))
"""

CORE = [f"nemo_tst.core.{p.stem}" for p in (ROOT / "nemo_tst" / "core").glob("*.py") if p.stem != "__init__"]


def _loaded_by(*modules: str) -> set:
    """The megatron.training / megatron.bridge / nemo_tst modules a fresh interpreter holds
    after importing `modules`."""
    out = subprocess.run([sys.executable, "-c", LAYERS, *modules], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


@pytest.mark.parametrize("modules", [CORE, ["nemo_tst.bridge"]], ids=["core", "bridge"])
def test_core_and_bridge_import_no_megatron_training(modules):
    assert len(modules) >= 6 or modules == ["nemo_tst.bridge"]
    loaded = _loaded_by(*modules)
    assert not [m for m in loaded if m.startswith(("megatron.training", "megatron.bridge"))], loaded
    assert not [m for m in loaded if m.startswith("nemo_tst.training")], loaded


def test_the_megatron_lm_adapter_does_not_import_bridge():
    loaded = _loaded_by("nemo_tst.training.pretrain", "nemo_tst.training.driver", "nemo_tst.training.step")
    assert not [m for m in loaded if m.startswith("nemo_tst.bridge")], loaded
    assert "megatron.training" in loaded  # what the adapter is for
