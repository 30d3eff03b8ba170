"""The recipes in `conf/`: names, parallel and precision presets, and `key=value` overrides.

    conf/recipes/<name>.yaml   model, training, tst, and `parallel` presets keyed by GPU count
    conf/precision.yaml        bf16, fp8_delayed, fp8_current, mxfp8 -> Megatron arguments

`load_recipe("tst_qwen3_10b_a1b", gpus=64, precision="fp8_delayed",
overrides=["tst.bag_size=8", "data.prefix=/data/dclm"])` returns a `TSTRecipe`. Unknown
recipe names, presets and override keys are refused with the valid choices.
"""

import dataclasses
import types
import typing
from typing import Iterable, Optional

from nemo_tst.conf import CONF_DIR, read_conf
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
    "resolve_override_key",
]

SECTIONS = {
    "model": ModelShape, "training": TrainingSchedule, "tst": TSTSettings,
    "parallel": ParallelLayout, "precision": Precision, "data": DataPaths,
}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "recipes").glob("*.yaml"))


def precision_names() -> list[str]:
    return list(read_conf(CONF_DIR / "precision.yaml"))


def _precision(name: str) -> Precision:
    presets = read_conf(CONF_DIR / "precision.yaml")
    if name not in presets:
        raise ValueError(f"unknown precision {name!r}; choose one of {sorted(presets)} "
                         "(conf/precision.yaml)")
    preset = presets[name]
    return Precision(name=name, args=[str(a) for a in preset["args"]])


def _default_gpus(presets: dict[int, object]) -> int:
    """8 where the recipe has an 8-GPU preset (a node), else its smallest usable preset."""
    usable = sorted(k for k, v in presets.items() if isinstance(v, dict))
    return 8 if 8 in usable else usable[0]


def load_recipe(name: str, *, gpus: Optional[int] = None, precision: str = "bf16",
                overrides: Iterable[str] = ()) -> TSTRecipe:
    """The recipe `name` with the parallel preset for `gpus` and a precision preset, then
    `overrides` (`section.field=value`) applied in order."""
    if name not in recipe_names():
        raise ValueError(f"unknown recipe {name!r}; choose one of {recipe_names()} (conf/recipes/)")
    conf = read_conf(CONF_DIR / "recipes" / f"{name}.yaml")
    presets = {int(k): v for k, v in conf["parallel"].items()}
    gpus = _default_gpus(presets) if gpus is None else gpus
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
        model=ModelShape(**conf["model"]),
        training=TrainingSchedule(**conf["training"]),
        tst=TSTSettings(**conf["tst"]),
        parallel=ParallelLayout(**layout),
        precision=_precision(precision),
    )
    return apply_overrides(recipe, overrides)


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


def apply_overrides(recipe: TSTRecipe, overrides: Iterable[str]) -> TSTRecipe:
    """`section.field=value` (or `field=value` for top-level fields; a leading `recipe.` is
    allowed, as NeMo-Run writes it). `precision=<preset>` swaps the precision preset."""
    import yaml

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
        if section:
            part = dataclasses.replace(getattr(recipe, section), **{leaf: value})
            recipe = dataclasses.replace(recipe, **{section: part})
        else:
            recipe = dataclasses.replace(recipe, **{leaf: value})
    return recipe
