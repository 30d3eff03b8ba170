"""Recipes: the paper's scales as data (conf/recipes/*.yaml), parallel and precision presets,
validation before launch, `nemo-tst plan`, and the NeMo-Run two-stage experiment.

    config.py      TSTRecipe and its sections -> Megatron-LM arguments
    catalog.py     conf/ -> TSTRecipe; presets and key=value overrides
    plan.py        checks before launch; steps, tokens, FLOPs, GPU-hours, data budget
    experiment.py  NeMo-Run: factories, executors (local, Slurm, Docker), phase 2 after phase 1
"""

from nemo_tst.recipes.catalog import apply_overrides, load_recipe, precision_names, recipe_names
from nemo_tst.recipes.config import TSTRecipe
from nemo_tst.recipes.plan import check_recipe, format_plan, plan_report

__all__ = [
    "TSTRecipe", "apply_overrides", "check_recipe", "format_plan", "load_recipe", "plan_report",
    "precision_names", "recipe_names",
]
