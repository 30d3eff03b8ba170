"""nemo_tst.megatron_fixes: the megatron-core fixes every launch applies, on any device.

Each case runs in a fresh interpreter without `nemo_tst.cpu`: these fixes are what a GPU launch
gets, so nothing of the CPU stand-ins may be in effect when they are checked.
"""

import subprocess
import sys
import textwrap

from nemo_tst import megatron_fixes
from tests.test_cpu_support import missing_megatron_names


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_every_megatron_name_the_fixes_use_exists():
    assert len(megatron_fixes.MEGATRON_NAMES) == len(set(megatron_fixes.MEGATRON_NAMES))
    assert missing_megatron_names(megatron_fixes.MEGATRON_NAMES) == []


def test_every_megatron_bridge_name_the_fixes_use_exists():
    from tests import te_absent_standin

    te_absent_standin.install()
    assert megatron_fixes.BRIDGE_FIX_NAMES == ("megatron.bridge.training.initialize:compile_helpers",)
    assert missing_megatron_names(megatron_fixes.BRIDGE_FIX_NAMES) == []


def test_the_dataset_helpers_need_no_make_in_a_pip_install():
    """Megatron's own compile_helpers runs `make` where the wheel ships no Makefile and exits
    the process; after the fixes the shipped helpers_cpp extension is used as it is."""
    unfixed = _python("""
        from megatron.core.datasets.utils import compile_helpers
        compile_helpers()
    """)
    assert unfixed.returncode == 1  # what every launch from a pip install would do
    fixed = _python("""
        import sys
        from nemo_tst.megatron_fixes import apply_megatron_fixes
        apply_megatron_fixes()
        apply_megatron_fixes()  # twice: no double wrapping
        from megatron.core.datasets.utils import compile_helpers
        assert compile_helpers.__wrapped__.__module__ == "megatron.core.datasets.utils"
        compile_helpers()
        from megatron.core.datasets import helpers_cpp
        assert "nemo_tst.cpu" not in sys.modules
        print("helpers ready")
    """)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "helpers ready" in fixed.stdout


def test_a_launch_without_tst_cpu_applies_the_fixes():
    """The per-rank entry applies the fixes first, whatever else it is asked (here it then
    refuses: this machine has no GPU and --tst-cpu is not given)."""
    result = _python("""
        import sys
        from nemo_tst.training import pretrain
        from nemo_tst.recipes.catalog import load_recipe
        recipe = load_recipe("tst_tiny", overrides=["transformer_impl=local", "data.prefix=/no/corpus"])
        try:
            pretrain.main([*recipe.megatron_args(), "--tst-phase", "1"])
        except ValueError as err:
            print("refused:", err)
        import megatron.core.datasets.utils as utils
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
        print("fixed:", hasattr(utils.compile_helpers, "__wrapped__"),
              hasattr(DistributedOptimizer._set_main_param_and_optimizer_states, "__wrapped__"))
        print("cpu stand-ins:", "nemo_tst.cpu" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: this machine has no CUDA GPU" in result.stdout
    assert "fixed: True True" in result.stdout
    assert "cpu stand-ins: False" in result.stdout
