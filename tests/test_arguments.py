"""nemo_tst.training.arguments: Megatron-LM's parser and validation without touching the process,
and what the machine a run launches on must provide (check_runtime)."""

import argparse
import os
import sys
import threading
import warnings

import pytest
import torch

from nemo_tst.recipes.catalog import load_recipe
from nemo_tst.training.arguments import (
    check_runtime,
    check_with_megatron,
    import_problem,
    parse_megatron_args,
)


def tiny_argv(*overrides: str) -> list[str]:
    return load_recipe("tst_tiny", gpus=1, overrides=list(overrides)).megatron_args()


def _process_state() -> tuple:
    """What parsing or validating might change for every thread of the process."""
    from megatron.training import arguments as megatron_arguments

    return (id(os.environ), dict(os.environ), sys.stdout, sys.stderr, list(sys.argv),
            argparse.ArgumentParser.error, megatron_arguments.get_device_arch_version,
            list(warnings.filters), torch.are_deterministic_algorithms_enabled())


def test_parsing_and_validating_from_two_threads_leaves_the_process_alone(tmp_path):
    """The demo plans and checks its two runs side by side: while two threads parse and validate
    (one run Megatron accepts, in deterministic mode, and one it refuses), a third sees nothing
    process-wide change, not even for a moment."""
    good = [*tiny_argv("cpu=true", f"run_dir={tmp_path}"), "--deterministic-mode"]
    bad = [*tiny_argv("cpu=true", f"run_dir={tmp_path}"), "--save-interval", "0"]
    parse_megatron_args(good)  # the first call imports Megatron's trainer quietly (see _megatron_arguments)
    before, changes, outcomes = _process_state(), [], []

    def plan(argv):
        for _ in range(3):
            try:
                check_with_megatron(parse_megatron_args(argv), world_size=1)
                outcomes.append("accepted")
            except ValueError as err:
                outcomes.append(str(err))

    workers = [threading.Thread(target=plan, args=(argv,)) for argv in (good, bad)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        now = _process_state()
        if now != before:
            changes.append([i for i, (a, b) in enumerate(zip(before, now)) if a != b])
    for worker in workers:
        worker.join()
    assert not changes, f"process state changed while validating (fields {changes[0]} of _process_state)"
    assert outcomes.count("accepted") == 3 and len(outcomes) == 6, outcomes
    assert all(o.startswith("Megatron-LM refuses these arguments: --save-interval > 0")
               for o in outcomes if o != "accepted"), outcomes


def test_a_bad_argument_is_one_line_from_the_callers_parser_only():
    from nemo_tst.errors import UsageError

    with pytest.raises(UsageError, match=r"unrecognized arguments: --tst-bag-sise .*--megatron-help"):
        parse_megatron_args([*tiny_argv(), "--tst-bag-sise", "4"])
    with pytest.raises(SystemExit):  # every other parser keeps argparse's own behaviour
        argparse.ArgumentParser().parse_args(["--unknown"])


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
    args = parse_megatron_args(tiny_argv("transformer_impl=transformer_engine"))
    with pytest.raises(ValueError, match=r"needs Transformer Engine, which does not import here "
                                         r"\(ImportError: transformer_engine_torch.so: undefined symbol"):
        check_runtime(args)


def test_import_problem_names_the_error():
    assert import_problem("json") is None
    assert import_problem("no_such_module_here").startswith("ModuleNotFoundError: No module named")
