"""nemo_tst.training.arguments: what the machine a run launches on must provide (check_runtime)."""

import sys

import pytest
import torch

from nemo_tst.training.arguments import check_runtime, import_problem
from nemo_tst.training.driver import parse_megatron_args

BASE = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "1", "--train-iters", "4",
        "--tst-bag-size", "2", "--tst-cpu"]


@pytest.fixture
def broken_transformer_engine(tmp_path, monkeypatch):
    """A Transformer Engine that is installed (find_spec finds it) but whose torch extension
    cannot load, as when it was built for another torch or CUDA."""
    package = tmp_path / "site" / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    dist_info = tmp_path / "site" / "transformer_engine-2.8.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformer-engine\nVersion: 2.8.0\n")
    (package / "pytorch" / "__init__.py").write_text(
        "raise ImportError('transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        del sys.modules[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a working TE")
def test_an_installed_transformer_engine_that_does_not_import_is_refused(broken_transformer_engine):
    import importlib.util

    assert importlib.util.find_spec("transformer_engine") is not None  # installed ...
    assert import_problem("transformer_engine.pytorch").startswith("ImportError: transformer_engine_torch.so")
    args = parse_megatron_args([*BASE, "--transformer-impl", "transformer_engine"])
    with pytest.raises(ValueError, match=r"needs Transformer Engine, which does not import here "
                                         r"\(ImportError: transformer_engine_torch.so: undefined symbol"):
        check_runtime(args)


def test_import_problem_names_the_error():
    assert import_problem("json") is None
    assert import_problem("no_such_module_here").startswith("ModuleNotFoundError: No module named")
