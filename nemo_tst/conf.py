"""The repository's `conf/`: YAML data (demo sizes, recipes, precision presets), read here."""

from pathlib import Path

__all__ = ["CONF_DIR", "read_conf"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def read_conf(path: Path) -> dict:
    """A YAML file under conf/, or FileNotFoundError saying where conf/ comes from."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: nemo-tst reads it from the repository's conf/; install nemo-tst "
            "from a source checkout (scripts/setup.sh installs it in editable mode) or use the "
            "Docker image"
        )
    return yaml.safe_load(path.read_text())
