"""The recipes: names, parallel and precision presets, and `key=value` overrides.

    conf/recipes/<name>.yaml   built-in: model, training, tst, and `parallel`
                                        presets keyed by GPU count (package data)
    conf/precision.yaml        bf16, fp8_delayed, fp8_current, mxfp8 -> Megatron arguments
    RECIPE_DIR/<name>.yaml              a user's own recipes in the same schema (`recipe_dir=`,
                                        `nemo-tst plan/recipes --recipe-dir`)

`load_recipe("tst_qwen3_10b_a1b", gpus=64, precision="fp8_delayed",
overrides=["tst.bag_size=8", "data.prefix=/data/dclm"])` returns a `TSTRecipe`. Unknown
recipe names, presets and override keys are refused with the valid choices.
"""

import dataclasses
import types
import typing
from pathlib import Path
from typing import Iterable, Optional, Union

from nemo_tst.conf import CONF_DIR, conf_file, read_conf, recipe_files
from nemo_tst.core.settings import SettingError
from nemo_tst.recipes.config import (
    DataPaths,
    ModelShape,
    ParallelLayout,
    Precision,
    TrainingSchedule,
    TSTRecipe,
    TSTSettings,
)

__all__ = [
    "CONF_DIR", "apply_overrides", "load_recipe", "precision_names", "recipe_names",
    "recipe_sources", "resolve_override_key",
]

SECTIONS = {
    "model": ModelShape, "training": TrainingSchedule, "tst": TSTSettings,
    "parallel": ParallelLayout, "precision": Precision, "data": DataPaths,
}
# The sections a recipe file holds (precision and data come from presets and overrides).
RECIPE_FILE_SECTIONS = ("model", "training", "tst", "parallel")


def recipe_sources(recipe_dir: Union[str, Path, None] = None) -> dict:
    """Recipe name -> its YAML file: the built-in recipes, then every `<name>.yaml` in
    `recipe_dir` (a user's directory). A user file with a built-in recipe's name takes
    precedence over the built-in one. A `recipe_dir` that is not a directory, or holds no
    `<name>.yaml`, is a ValueError naming it."""
    sources = dict(recipe_files())
    if recipe_dir is not None:
        directory = Path(recipe_dir).expanduser()
        if not directory.is_dir():
            raise ValueError(f"recipe directory {directory} does not exist (--recipe-dir / "
                             "recipe_dir=): give a directory of <name>.yaml recipe files")
        own = {path.stem: path for path in sorted(directory.glob("*.yaml")) if path.is_file()}
        if not own:
            raise ValueError(f"recipe directory {directory} holds no <name>.yaml recipe files "
                             "(--recipe-dir / recipe_dir=)")
        sources.update(own)
    return dict(sorted(sources.items()))


def recipe_names(recipe_dir: Union[str, Path, None] = None) -> list[str]:
    """The built-in recipes' names and those of `recipe_dir`'s `<name>.yaml` files, sorted."""
    return list(recipe_sources(recipe_dir))


def precision_names() -> list[str]:
    return list(read_conf(conf_file("precision.yaml")))


def _precision(name: str) -> Precision:
    presets = read_conf(conf_file("precision.yaml"))
    if name not in presets:
        raise ValueError(f"unknown precision {name!r}; choose one of {sorted(presets)} "
                         "(conf/precision.yaml)")
    preset = presets[name]
    return Precision(name=name, args=[str(a) for a in preset["args"]])


def _read_recipe_file(source) -> dict:
    """A recipe file's YAML, or a ValueError naming the file and what it lacks."""
    conf = read_conf(source)
    missing = [s for s in RECIPE_FILE_SECTIONS if not isinstance((conf or {}).get(s), dict)]
    if not isinstance(conf, dict) or missing:
        raise ValueError(f"recipe file {source} needs the sections {list(RECIPE_FILE_SECTIONS)} "
                         f"as mappings; missing or not a mapping: {missing}")
    return conf


# How a recipe spells the settings a `SettingError` names (`tst.bag_size`, ...).
RECIPE_NAMES = {f.name: f"tst.{f.name}" for f in dataclasses.fields(TSTSettings)} | {
    "train_iters": "training.train_iters"}


def _section(cls, fields: dict, section: str, source):
    try:
        return cls(**fields)
    except TypeError as err:  # an unknown or missing field
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"recipe file {source}, section {section}: {err}; its fields are: {known}") from None
    except SettingError as err:
        raise ValueError(f"recipe file {source}: {err.named(RECIPE_NAMES)}") from None


def _default_gpus(presets: dict[int, object], source) -> int:
    """8 where the recipe has an 8-GPU preset (a node), else its smallest usable preset."""
    usable = sorted(k for k, v in presets.items() if isinstance(v, dict))
    if not usable:
        raise ValueError(f"recipe file {source}: `parallel` has no usable preset (GPU count -> "
                         "layout mapping, e.g. `1: {tensor_model_parallel_size: 1}`)")
    return 8 if 8 in usable else usable[0]


def load_recipe(name: str, *, gpus: Optional[int] = None, precision: str = "bf16",
                overrides: Iterable[str] = (), recipe_dir: Union[str, Path, None] = None) -> TSTRecipe:
    """The recipe `name` with the parallel preset for `gpus` and a precision preset, then
    `overrides` (`section.field=value`) applied in order. `recipe_dir`: a directory of the
    user's own `<name>.yaml` recipes, searched as well; its file wins over a built-in recipe
    of the same name."""
    sources = recipe_sources(recipe_dir)
    if name not in sources:
        where = "conf/recipes/" + (f" and {recipe_dir}" if recipe_dir is not None else "")
        raise ValueError(f"unknown recipe {name!r}; choose one of {list(sources)} ({where})")
    source = sources[name]
    conf = _read_recipe_file(source)
    presets = {int(k): v for k, v in conf["parallel"].items()}
    gpus = _default_gpus(presets, source) if gpus is None else gpus
    if gpus not in presets:
        raise ValueError(
            f"recipe {name} has parallel presets for {sorted(presets)} GPUs, not {gpus}: pick "
            "one with gpus=..., then scale with parallel.num_gpus=... if the layout still fits"
        )
    if not isinstance(presets[gpus], dict):
        raise ValueError(f"recipe {name} on {gpus} GPU(s): {presets[gpus]}")
    layout = dict(presets[gpus])
    layout.setdefault("num_gpus", gpus)
    recipe = TSTRecipe(
        name=name,
        model=_section(ModelShape, conf["model"], "model", source),
        training=_section(TrainingSchedule, conf["training"], "training", source),
        tst=_section(TSTSettings, conf["tst"], "tst", source),
        parallel=_section(ParallelLayout, layout, f"parallel.{gpus}", source),
        precision=_precision(precision),
    )
    recipe = apply_overrides(recipe, overrides)
    check_numbers(recipe)
    return recipe


def _coerce(value, annotation, key: str):
    """`value` (parsed as YAML) converted to the field's type, or a ValueError naming `key`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        annotation = options[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        return str(value)
    elif annotation is list or typing.get_origin(annotation) is list:
        return [str(v) for v in (value if isinstance(value, list) else str(value).split())]
    else:
        return value
    raise ValueError(f"override {key}={value!r}: expected {annotation.__name__}")


def resolve_override_key(key: str) -> tuple[str, str, object]:
    """`section.field` (or a top-level field) -> (section, field, its type annotation), or a
    ValueError listing the valid keys."""
    key = key.strip().removeprefix("recipe.")
    section, _, leaf = key.rpartition(".")
    target_cls = SECTIONS.get(section) if section else TSTRecipe
    if target_cls is None:
        raise ValueError(f"unknown override key {key!r}: sections are {sorted(SECTIONS)}")
    known = {f.name for f in dataclasses.fields(target_cls)}
    if section == "" and leaf in SECTIONS:
        raise ValueError(f"override {key!r} names a section; set one of its fields, e.g. "
                         f"{leaf}.{dataclasses.fields(SECTIONS[leaf])[0].name}=...")
    if leaf not in known:
        raise ValueError(
            f"unknown override key {key!r}; {section or 'the recipe'} has: {', '.join(sorted(known))}"
        )
    return section, leaf, typing.get_type_hints(target_cls)[leaf]


# The numbers of a recipe that may be 0 (every other count must be >= 1), and the numbers with
# an interval of their own; the TST settings check themselves (`TSTSettings`).
_ZERO_ALLOWED = {"warmup_iters", "num_workers", "min_lr", "weight_decay", "clip_grad", "moe_aux_loss_coeff"}
_INTERVALS = {
    "decay_fraction": (0.0, 1.0, "(0, 1]"),
    "adam_beta1": (0.0, 1.0, "[0, 1)"),
    "adam_beta2": (0.0, 1.0, "[0, 1)"),
}


def check_numbers(recipe: TSTRecipe) -> None:
    """Refuse a number nobody can mean (a count below 1, a negative rate, a fraction outside
    its interval), naming it as an override would (`section.field`)."""
    import math

    for section in ("model", "training", "parallel", "data"):
        part = getattr(recipe, section)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{section}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name}={value} must be a finite number")
            if f.name in _INTERVALS:
                low, high, text = _INTERVALS[f.name]
                ok = (low < value <= high) if text.startswith("(") else (low <= value < high)
                if not ok:
                    raise ValueError(f"{name}={value} must lie in {text}")
            elif f.name in _ZERO_ALLOWED:
                if value < 0:
                    raise ValueError(f"{name}={value} must be >= 0")
            elif (value < 1 if isinstance(value, int) else value <= 0):
                raise ValueError(f"{name}={value} must be {'at least 1' if isinstance(value, int) else '> 0'}")


def apply_overrides(recipe: TSTRecipe, overrides: Iterable[str]) -> TSTRecipe:
    """`section.field=value` (or `field=value` for top-level fields; a leading `recipe.` is
    allowed, as NeMo-Run writes it). `precision=<preset>` swaps the precision preset."""
    import yaml

    phase1_length = []  # which of tst.phase1_fraction / tst.phase1_iters the overrides set
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value (e.g. tst.bag_size=8)")
        key = key.strip().removeprefix("recipe.")
        value = yaml.safe_load(text) if text.strip() else None
        if key == "precision":
            recipe = dataclasses.replace(recipe, precision=_precision(str(value)))
            continue
        section, leaf, annotation = resolve_override_key(key)
        value = _coerce(value, annotation, key)
        changes = {leaf: value}
        if section == "tst" and leaf in ("phase1_fraction", "phase1_iters") and value is not None:
            phase1_length.append(item)
            if len(set(i.split("=", 1)[0] for i in phase1_length)) > 1:
                raise ValueError(f"overrides {phase1_length} both set phase 1's length; give one of them")
            # The override replaces how the recipe gives phase 1's length.
            changes["phase1_iters" if leaf == "phase1_fraction" else "phase1_fraction"] = None
        if section:
            try:
                part = dataclasses.replace(getattr(recipe, section), **changes)
            except SettingError as err:  # TSTSettings checks itself as it is built
                raise ValueError(f"override {item!r}: {err.named(RECIPE_NAMES)}") from None
            recipe = dataclasses.replace(recipe, **{section: part})
        else:
            recipe = dataclasses.replace(recipe, **{leaf: value})
    return recipe
