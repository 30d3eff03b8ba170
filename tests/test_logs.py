"""Reading Megatron's training log back, and what of it reaches the terminal
(nemo_tst/training/logs.py)."""

import logging

import pytest

from nemo_tst.training.logs import (
    is_progress_line, iteration_line, parse_training_log, progress_text, quiet_cuda_runtime_notice,
)


def _line(it, loss, key="lm loss"):
    return (f" [2026-11-23 10:00:0{it}] iteration        {it}/      10 | consumed samples: {4 * it} | "
            f"learning rate: 1.000000E-03 | {key}: {loss:.6E} | loss scale: 1.0 |")


def test_the_second_line_after_a_start_is_unaveraged():
    """Megatron 0.19 prints iteration k+1 averaged with k, the first iteration a process logs."""
    first, second, third = 6.25, 6.0, 5.5
    text = "\n".join(["training ...", _line(1, first), _line(2, (first + second) / 2), _line(3, third)])
    log = parse_training_log(text)
    assert [log.loss(i) for i in (1, 2, 3)] == [first, second, third]


def test_process_start_shared_with_another_ranks_output():
    """With several ranks on one pipe the start marker can share its line with other output."""
    first, second = 6.25, 6.0
    for start in ("[rank1]: building model ...training ...", "training ...[default1]: done"):
        text = "\n".join([start, _line(4, first), _line(5, (first + second) / 2)])
        assert parse_training_log(text).loss(5) == second


def test_tst_loss_is_the_phase_1_loss():
    log = parse_training_log("\n".join(["training ...", _line(1, 7.0, key="tst loss")]))
    assert log.loss(1) == 7.0


def test_a_loss_key_no_longer_reported_is_not_read_as_zero():
    """One launch through both code paths (s = 1): after phase 1, Megatron keeps printing its
    "tst loss" key as 0; the loss of those iterations is the next-token one."""
    stale = _line(5, 6.0).replace("| loss scale", "| tst loss: 0.000000E+00 | loss scale")
    log = parse_training_log("\n".join(["training ...", _line(4, 7.0, key="tst loss"), _line(5, 6.0), stale]))
    assert log.loss(4) == 7.0 and log.loss(5) == 6.0
    assert "tst loss" not in log.train[5]


def test_an_interval_over_the_switch_in_one_process():
    """s = 1 in one launch: the line whose interval spans both code paths carries both keys,
    each a sum over the interval's iterations divided by all of them."""
    both = _line(10, 3.0).replace("| loss scale", "| tst loss: 3.100000E+00 | loss scale")
    log = parse_training_log("\n".join([both]))
    assert log.loss(10) == 6.1


# Lines of a CPU run's SAVE/train.log (megatron-core 0.19, `nemo-tst pretrain ... --tst-cpu`).
TERMINAL_LINES = [
    _line(4, 5.4),
    " validation loss at iteration 5 | lm loss value: 5.062539E+00 | lm loss PPL: 1.579912E+02 | ",
    "  [2026-12-02 05:11:05.448783] successfully saved checkpoint from iteration       5 to "
    "/r/phase2 [ t 1/1, gtp_remat 1/1, p 1/1 ]",
    "  successfully loaded checkpoint from /r/phase1 [ t 1/1, gtp_remat 1/1, p 1/1 ] at "
    "iteration 3",
    "[exiting program at iteration 3] datetime: 2026-12-02 05:10:50.202118 ",
    "[tst] iteration 4 | phase 2 | s 1 | latent positions 32 | text tokens 1664",
    "[nemo-tst] phase 2 (iterations 4-10) on 1 process(es); trainer output: /r/train.log",
    "ERROR:megatron.training.training:loss is nan",
]
LOG_FILE_ONLY_LINES = [
    "W1202 05:10:47.959000 8150 torch/utils/cpp_extension.py:183] No CUDA runtime is found, using "
    "CUDA_HOME='/usr/local'",
    "/x/megatron/core/optimizer/__init__.py:25: UserWarning: Transformer Engine and Apex are not "
    "installed. Falling back to Torch optimizers.",
    "  warnings.warn(",
    "------------------------ arguments ------------------------",
    "  adam_beta1 ...................................... 0.9",
    "INFO:megatron.core.num_microbatches_calculator:setting number of microbatches to constant 2",
    "WARNING:megatron.core.rerun_state_machine:RerunStateMachine initialized in mode "
    "RerunMode.VALIDATE_RESULTS",
    "WARNING:megatron.core.models.gpt.gpt_model:GPTModel IS DEPRECATED. GPTModel is only accepting "
    "critical bug fixes",
    "WARNING: one_logger package is required to enable e2e metrics tracking.",
    "WARNING: could not find the metadata file /r/phase1/latest_checkpointed_iteration.txt",
    "/x/torch/distributed/c10d_logger.py:83: FutureWarning: "
    "`torch.distributed.all_gather_into_tensor` is deprecated.",
    "> initializing torch distributed ...",
    "[after megatron is initialized] datetime: 2026-12-02 05:10:49.820053 ",
    " > number of parameters on (tensor, gtp_weight_remat, pipeline) model parallel rank "
    "(0, 0, 0): 126720",
    "training ...",
]


@pytest.mark.parametrize("line", TERMINAL_LINES)
def test_progress_lines_reach_the_terminal(line):
    assert is_progress_line(line)


@pytest.mark.parametrize("line", LOG_FILE_ONLY_LINES)
def test_start_up_reports_and_warnings_stay_in_the_log_file(line):
    assert not is_progress_line(line)
    assert progress_text(line + "\n") is None


@pytest.mark.parametrize("line", TERMINAL_LINES)
def test_a_progress_line_reaches_the_terminal_whole(line):
    assert progress_text(line + "\n") == line + "\n"


def test_another_ranks_unfinished_line_before_a_progress_line_is_cut():
    """Two ranks on one pipe (seen with --nproc-per-node 2): rank 0's parameter report had not
    ended its line when the last rank printed the per-interval line."""
    shared = "Number of parameters in transformer block in billions:  0.00" + _line(1, 5.8) + "\n"
    assert progress_text(shared) == _line(1, 5.8) + "\n"
    assert progress_text("[rank1]: building ... validation loss at iteration 5 | lm loss value: "
                         "5.0E+00 |\n") == "validation loss at iteration 5 | lm loss value: 5.0E+00 |\n"
    error = "[rank0]: RuntimeError: shape mismatch at iteration 3/ 10 |\n"
    assert progress_text(error) == error


def test_the_cuda_runtime_notice_is_dropped_and_nothing_else():
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    saved = list(cpp_extension_log.filters)
    # `import nemo_tst.cli` installs it already: start from the logger without it.
    cpp_extension_log.filters[:] = [f for f in saved if type(f).__name__ != "_DropCudaRuntimeNotice"]
    before = list(cpp_extension_log.filters)
    try:
        quiet_cuda_runtime_notice()
        quiet_cuda_runtime_notice()  # idempotent: one filter
        assert len(cpp_extension_log.filters) == len(before) + 1

        def passes(msg, *args):
            record = cpp_extension_log.makeRecord(
                cpp_extension_log.name, logging.WARNING, __file__, 1, msg, args, None)
            return bool(cpp_extension_log.filter(record))

        assert not passes("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        assert passes("Your compiler (%s) is not compatible with the compiler Pytorch was built "
                      "with", "c++")
    finally:
        cpp_extension_log.filters[:] = saved


def test_trainer_lines_for_the_terminal():
    assert is_progress_line(_line(3, 6.0))
    assert iteration_line(_line(3, 6.0, key="tst loss")) == (3, 10, {"learning rate": 1e-3, "tst loss": 6.0})
    assert is_progress_line(" validation loss at iteration 10 | lm loss value: 6.5E+00 |")
    for noise in ("------------------------ arguments ------------------------",
                  "  adam_beta1 ...................................... 0.9",
                  "/x/megatron/core/optimizer/__init__.py:25: UserWarning: Transformer Engine and Apex "
                  "are not installed.",
                  "WARNING:megatron.core.models.gpt.gpt_model:GPTModel IS DEPRECATED."):
        assert not is_progress_line(noise), noise
