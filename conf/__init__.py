"""nemo-tst's YAML data: the top-level conf/ of the source tree, installed as the package
`nemo_tst.conf` (pyproject.toml maps the directory to that name):

    demo.yaml               the demo's sizes
    precision.yaml          precision presets -> Megatron arguments
    recipes/<name>.yaml     the built-in recipes

Read through `importlib.resources`, so a wheel or `pip install .` carries them as an editable
install or a checkout on PYTHONPATH does. A packaged file that is missing means a broken
install, not a missing checkout.
"""

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Union

__all__ = ["CONF_DIR", "CONF_FILES", "conf_file", "read_conf", "recipe_files"]

# The package's data as importlib.resources sees it (a directory on disk for a wheel or an
# editable install; a Traversable in general).
CONF_FILES: Traversable = resources.files(__name__)
# The same directory as a Path, for callers that join paths (nemo_tst.demo: CONF_DIR / "demo.yaml").
CONF_DIR = Path(__file__).resolve().parent

REINSTALL_HINT = ("the nemo-tst install is broken (its package data nemo_tst.conf is incomplete): "
                  "reinstall it, e.g. `pip install --force-reinstall nemo-tst` or `pip install .` "
                  "from a checkout")


def conf_file(name: str) -> Traversable:
    """The packaged file `name` of nemo_tst.conf (e.g. "precision.yaml",
    "recipes/tst_tiny.yaml"); read_conf() it."""
    entry = CONF_FILES
    for part in name.split("/"):
        entry = entry / part
    return entry


def recipe_files() -> dict[str, Traversable]:
    """The built-in recipes: name -> its recipes/<name>.yaml, or FileNotFoundError when the
    package holds none (a broken install, never an empty catalog)."""
    directory = CONF_FILES / "recipes"
    found = ({entry.name.removesuffix(".yaml"): entry for entry in directory.iterdir()
              if entry.name.endswith(".yaml") and entry.is_file()} if directory.is_dir() else {})
    if not found:
        raise FileNotFoundError(f"no recipes in {directory}: {REINSTALL_HINT}")
    return dict(sorted(found.items()))


def _is_packaged(path: Union[Path, Traversable]) -> bool:
    return str(path).startswith(str(CONF_FILES)) or str(path).startswith(str(CONF_DIR))


def read_conf(path: Union[Path, Traversable]) -> dict:
    """The YAML file `path` (a packaged one from conf_file(), or a user's file), or a
    FileNotFoundError: for a packaged file it says that the install is broken."""
    import yaml

    if not path.is_file():
        if _is_packaged(path):
            raise FileNotFoundError(f"{path} is missing: {REINSTALL_HINT}")
        raise FileNotFoundError(f"{path} is missing")
    return yaml.safe_load(path.read_text())
