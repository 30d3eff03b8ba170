"""`python -m nemo_tst.bridge.cli` on a machine without Transformer Engine (tests, CPU demos).

Installs the test-only Transformer Engine import stand-in (tests/te_absent_standin.py), then
runs the launcher with the same arguments. NEMO_TST_TEST_KILL_AFTER_SAVE=K makes the rank
SIGKILL itself after the checkpoint of iteration K (tests/test_bridge_training.py). Run it from the repository root, under torchrun:

    torchrun --nproc-per-node 1 tests/bridge_cpu_launch.py --recipe MODULE:FUNCTION --tst-cpu ...
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import te_absent_standin  # noqa: E402

te_absent_standin.install()

from nemo_tst.bridge.cli import main  # noqa: E402


def _kill_after_save(iteration: int) -> None:
    """Tests of a crash: SIGKILL this rank once the checkpoint of `iteration` is written (no
    clean-up, no exit handlers), as a node failure would."""
    import megatron.bridge.training.train as bridge_train

    save = bridge_train.save_checkpoint_and_time

    def save_then_die(state, *args, **kwargs):
        result = save(state, *args, **kwargs)
        if state.train_state.step == iteration:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    bridge_train.save_checkpoint_and_time = save_then_die


if __name__ == "__main__":
    if os.environ.get("NEMO_TST_TEST_KILL_AFTER_SAVE"):
        _kill_after_save(int(os.environ["NEMO_TST_TEST_KILL_AFTER_SAVE"]))
    main()
