"""nemo_tst.bridge, the optional Megatron-Bridge adapter.

Megatron-Bridge (the `bridge` extra, scripts/setup.sh) imports here, where Transformer Engine
is absent, through the test-only stand-in tests/conftest.py installs (tests/te_absent_standin.py).
Here: importing the module, the ImportError that says what to install (in a process without
the stand-in, where Bridge really cannot import), the version check, the plan and its checks
against numbers worked out by hand, the checkpoint-directory logic on tracker files in Bridge's
format, the context-parallel split, the phase-1 loss contract, the pre-wrap hook on a real
megatron-core GPTModel on CPU, the phase containers of a Bridge recipe, and a bf16,
distributed-optimizer, DP=2 run of both phases through Bridge's `pretrain`.
tests/test_bridge_training.py trains through the launcher and compares with Megatron-LM.
No part of Bridge is mocked.
"""

import argparse
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nemo_tst import bridge, cpu
from nemo_tst.bridge import (
    TSTSettings,
    check_phase_iteration,
    next_tst_phase,
    plan_tst_run,
    tst_model_hook,
)
from nemo_tst.core.context_parallel import split_for_context_parallel as cp_zigzag_slice
from nemo_tst.core.data import item_sequence_length, items_needed
from nemo_tst.core.loss import phase1_loss_terms as tst_phase1_loss
from nemo_tst.core.run_dir import RunDirectory
from nemo_tst.core.run_dir import latest_iteration as latest_checkpoint_iteration

def plan(tst=None, **kw):
    args = dict(run_dir="/ckpt/run", train_iters=1000, global_batch_size=32, seq_length=8)
    args.update(kw)
    return plan_tst_run(tst or TSTSettings(bag_size=4, phase1_fraction=0.3), **args)


def sample_tokens(p):
    """Tokens one phase-1 sample holds: s*L inputs + the last position's targets."""
    return p.superposition.sample_length(p.seq_length)


def phase_dir(run, phase):
    return RunDirectory(run).phase_dir(phase)


def phase2_load_dir(run, p):
    return RunDirectory(run).phase2_source(p)


# ------------------------------------------------------------------------------------------
# Without Bridge: import and the error that says what to install
# ------------------------------------------------------------------------------------------


def test_importing_the_adapter_imports_no_bridge():
    code = (
        "import sys, nemo_tst.bridge as b; "
        "assert not [m for m in sys.modules if m.split('.')[:2] == ['megatron', 'bridge']]; "
        "print(b.BRIDGE_VERSION, b.BRIDGE_COMMIT)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.6.0", "51885cf132b2814188b6855c25a8588254274c2a"]


_WITHOUT_BRIDGE = """
import json, nemo_tst.bridge as bridge
from nemo_tst.bridge import TSTSettings
calls = {
    "require_bridge": lambda: bridge.require_bridge(),
    "tst_phase_configs": lambda: bridge.tst_phase_configs(object(), TSTSettings(bag_size=4)),
    "tst_forward_step": lambda: bridge.tst_forward_step(None, iter([]), None),
    "tst_pretrain": lambda: bridge.tst_pretrain(object(), TSTSettings(bag_size=4)),
    "TSTDatasetProvider": lambda: bridge.TSTDatasetProvider,
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = None
    except ImportError as err:
        out[name] = [str(err), isinstance(err.__cause__, ImportError)]
print(json.dumps(out))
"""


def test_without_bridge_every_bridge_call_says_what_to_install():
    """In a process without the test stand-in, Megatron-Bridge cannot import (Transformer
    Engine is absent), as on any machine without TE: every Bridge-facing call says so."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _WITHOUT_BRIDGE], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(results) == {"require_bridge", "tst_phase_configs", "tst_forward_step",
                            "tst_pretrain", "TSTDatasetProvider"}
    for name, result in results.items():
        assert result is not None, f"{name} did not raise ImportError"
        message, chained = result
        for needed in ("scripts/setup.sh", "Transformer Engine", "Megatron-Bridge 0.6",
                       "transformer_engine", "nemo-tst pretrain"):
            assert needed in message, (name, needed)
        assert chained, name  # the original failure stays chained


@pytest.mark.parametrize("version, refused", [("0.6.2", False), ("0.6.5", False),
                                              ("0.7.0", True), ("1.0.0", True)])
def test_untested_bridge_versions_are_refused_in_one_line(monkeypatch, version, refused):
    import megatron.bridge

    from nemo_tst.bridge import checks

    monkeypatch.setattr(megatron.bridge, "__version__", version)
    monkeypatch.setattr(checks, "_version_warned", False)
    monkeypatch.delenv("NEMO_TST_BRIDGE_UNTESTED", raising=False)
    if not refused:
        assert bridge.require_bridge() == version
        return
    with pytest.raises(ImportError) as info:
        bridge.require_bridge()
    assert "\n" not in str(info.value) and f"Megatron-Bridge {version}" in str(info.value)
    assert "0.6" in str(info.value) and "NEMO_TST_BRIDGE_UNTESTED=1" in str(info.value)
    monkeypatch.setenv("NEMO_TST_BRIDGE_UNTESTED", "1")
    with pytest.warns(UserWarning, match=f"Megatron-Bridge {version}"):
        assert bridge.require_bridge() == version


def test_unknown_module_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        bridge.NoSuchThing  # noqa: B018


# ------------------------------------------------------------------------------------------
# The plan, from plain numbers
# ------------------------------------------------------------------------------------------


def test_plan_numbers_for_full_tst():
    p = plan()  # N=1000, r=0.3, B=32, L=8, s=4
    assert p.phase1_iters == 300  # 0.3 x 1000
    assert p.train_iters == 1000
    assert p.phase1_samples == 300 * 32
    # A phase-1 sample: 8 bags of 4 tokens, plus the 4 tokens the last position predicts.
    assert sample_tokens(p) == 8 * 4 + 4 == 36
    # It is exactly 4 phase-2 samples of L + 1 = 9 tokens; GPTDataset yields sequence_length + 1.
    assert item_sequence_length(p) == 35
    # Phase 1 reads one item per sample, phase 2 four samples per item: 700 x 32 / 4 items.
    assert items_needed(p) == 9600 + 700 * 32 // 4
    assert str(phase_dir("/ckpt/run", 1)) == os.path.join("/ckpt/run", "phase1")
    assert str(phase_dir("/ckpt/run", 2)) == os.path.join("/ckpt/run", "phase2")


@pytest.mark.parametrize(
    "mode, tokens, dataset_sequence_length",
    [
        ("full", 4 * 8 + 4, 4 * 9 - 1),  # 36 tokens = 4 pieces of 9
        ("input_only", 4 * 8 + 1, 4 * 9 - 1),  # 33 tokens -> 4 pieces of 9 (36)
        ("output_only", 8 + 4, 2 * 9 - 1),  # 12 tokens -> 2 pieces of 9 (18)
    ],
)
def test_phase1_sample_length_per_mode(mode, tokens, dataset_sequence_length):
    p = plan(TSTSettings(bag_size=4, mode=mode))
    assert sample_tokens(p) == tokens
    assert item_sequence_length(p) == dataset_sequence_length


def test_s1_is_megatrons_ordinary_sample():
    p = plan(TSTSettings(bag_size=1), seq_length=2048)
    assert sample_tokens(p) == 2049
    assert item_sequence_length(p) == 2048


def test_explicit_phase1_iters_instead_of_the_fraction():
    p = plan(TSTSettings(bag_size=6, phase1_iters=25), train_iters=100)
    assert p.phase1_iters == 25
    # Both set the same thing: refused, not silently resolved.
    with pytest.raises(ValueError, match="phase1_iters=25 and phase1_fraction=0.9 both set phase 1's length"):
        TSTSettings(bag_size=6, phase1_fraction=0.9, phase1_iters=25)


class _MegatronArgs(argparse.Namespace):
    """Megatron-LM args for plan_from_args: unset ones read as None (their defaults)."""

    def __getattr__(self, name):
        return None


@pytest.mark.parametrize(
    "N, r, n1",
    [(1000, 0.3, 300), (10, 0.25, 2), (10, 0.35, 4), (7, 0.5, 4), (333, 0.2, 67)],
)
def test_phase_split_matches_the_megatron_lm_integration(N, r, n1):
    """n1 = round(r * N) (Python's rounding: 2.5 -> 2, 3.5 -> 4), the same split as
    `nemo-tst pretrain` (nemo_tst.training.arguments) makes for the same N and r."""
    from nemo_tst.training.arguments import add_tst_arguments, plan_from_args

    tst_args = add_tst_arguments(argparse.ArgumentParser()).parse_args(
        ["--tst-bag-size", "4", "--tst-phase1-fraction", str(r)]
    )
    args = _MegatronArgs(**vars(tst_args))
    args.__dict__.update(
        train_iters=N, seq_length=8, global_batch_size=4, tensor_model_parallel_size=1,
        context_parallel_size=1, lr_decay_style="cosine",
    )
    assert plan_from_args(args).phase1_iters == n1
    assert plan(TSTSettings(bag_size=4, phase1_fraction=r), train_iters=N).phase1_iters == n1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bag_size=0), "bag_size"),
        (dict(bag_size=2.5), "bag_size"),
        (dict(bag_size=True), "bag_size"),
        (dict(bag_size=4, phase1_fraction=0.0), "phase1_fraction"),
        (dict(bag_size=4, phase1_fraction=1.0), "phase1_fraction"),
        (dict(bag_size=4, phase1_fraction=1.5), "phase1_fraction"),
        (dict(bag_size=4, phase1_fraction=math.nan), "phase1_fraction"),
        (dict(bag_size=4, phase1_iters=0), "phase1_iters"),
        (dict(bag_size=4, mode="bogus"), "mode"),
        (dict(bag_size=4, target_weights=[1.0, 2.0]), "target_weights"),
    ],
)
def test_bad_tst_settings_name_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TSTSettings(**kwargs)


@pytest.mark.parametrize(
    "tst_kwargs, plan_kwargs, match",
    [
        (dict(phase1_iters=100), dict(train_iters=100), r"phase1_iters=100 must be between 1 and .* = 99"),
        (dict(phase1_fraction=0.001), dict(train_iters=100), r"phase1_fraction=0.001 .* gives 0"),
        (dict(phase1_fraction=0.999), dict(train_iters=100), r"gives 100 phase-1 iterations"),
        ({}, dict(train_iters=None), r"cfg\.train\.train_iters"),
        ({}, dict(global_batch_size=None), r"cfg\.train\.global_batch_size"),
        ({}, dict(run_dir=""), r"cfg\.checkpoint\.save"),
        ({}, dict(mtp_num_layers=1), r"cfg\.model\.mtp_num_layers=1"),
        ({}, dict(seq_length=10, tensor_model_parallel_size=4, sequence_parallel=True),
         r"seq_length=10 .*tensor_model_parallel_size=4 under cfg\.model\.sequence_parallel"),
        ({}, dict(seq_length=6, context_parallel_size=2), r"2 x cfg\.model\.context_parallel_size = 4"),
        ({}, dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=80),
         r"lr_wsd_decay_iters=80 .* iteration 20 of a 100-iteration decay, inside phase 1 .* at most 70"),
        # A decay shorter than the run: the annealing starts at 35 - 10 = 25, inside phase 1.
        ({}, dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=10, lr_decay_iters=35),
         r"iteration 25 of a 35-iteration decay, inside phase 1 .* at most 5"),
        ({}, dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=10, lr_decay_iters=20),
         r"cfg\.scheduler\.lr_decay_iters=20 ends the LR decay inside phase 1"),
        ({}, dict(train_iters=100, lr_decay_style="WSD"), r"lr_wsd_decay_iters=100 \(unset"),
    ],
)
def test_bad_recipe_numbers_name_the_setting_and_the_fix(tst_kwargs, plan_kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(TSTSettings(bag_size=4, **tst_kwargs), **plan_kwargs)


@pytest.mark.parametrize(
    "tst_kwargs, plan_kwargs",
    [
        ({}, dict(seq_length=12, tensor_model_parallel_size=4, sequence_parallel=True)),
        ({}, dict(seq_length=10, tensor_model_parallel_size=4, sequence_parallel=False)),
        ({}, dict(seq_length=8, context_parallel_size=2)),
        (dict(bag_size=1), dict(mtp_num_layers=1)),  # s=1 is ordinary training: MTP is fine
        ({}, dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=70)),
        ({}, dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=10)),
        # Bridge's max_steps is the decay length: annealing 150 of 200 starts at 50 > n1 = 30.
        ({}, dict(train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=150, max_steps=200)),
        ({}, dict(train_iters=100, lr_decay_style="cosine")),
    ],
)
def test_good_recipe_numbers_pass(tst_kwargs, plan_kwargs):
    tst = TSTSettings(**({"bag_size": 4} | tst_kwargs))
    plan(tst, **plan_kwargs)


def test_each_container_refuses_the_other_phases_iterations():
    p = plan()  # n1 = 300
    check_phase_iteration(1, 0, p, "/ckpt/run")
    check_phase_iteration(1, 299, p, "/ckpt/run")
    with pytest.raises(RuntimeError, match="phase 1 ended at iteration 300.*phase-2 container"):
        check_phase_iteration(1, 300, p, "/ckpt/run")
    check_phase_iteration(2, 300, p, "/ckpt/run")
    check_phase_iteration(2, 999, p, "/ckpt/run")
    with pytest.raises(RuntimeError, match="phase 2 starts from phase 1's checkpoint of iteration 300"):
        check_phase_iteration(2, 0, p, "/ckpt/run")
    # s = 1: the phase-2 container is the whole run.
    check_phase_iteration(2, 0, plan(TSTSettings(bag_size=1)), "/ckpt/run")


# ------------------------------------------------------------------------------------------
# Checkpoint directories, read from trackers in Bridge's formats
# ------------------------------------------------------------------------------------------


def _bridge_tracker(directory, step):
    """`latest_train_state.pt` as Bridge writes it: TrainState.state_dict(), tensors."""
    os.makedirs(directory, exist_ok=True)
    state = {
        "step": torch.tensor(step, dtype=torch.int64),
        "consumed_train_samples": torch.tensor(step * 32, dtype=torch.int64),
        "skipped_train_samples": torch.tensor(0, dtype=torch.int64),
        "consumed_valid_samples": torch.tensor(0, dtype=torch.int64),
        "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float32),
        "do_train": torch.tensor(True),
        "do_valid": torch.tensor(False),
        "do_test": torch.tensor(False),
    }
    torch.save(state, os.path.join(directory, "latest_train_state.pt"))


def _legacy_tracker(directory, text):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(text)


def test_latest_checkpoint_iteration_reads_both_tracker_formats(tmp_path):
    assert latest_checkpoint_iteration(tmp_path / "absent") is None
    _legacy_tracker(tmp_path / "a", "120\n")
    assert latest_checkpoint_iteration(tmp_path / "a") == 120
    _legacy_tracker(tmp_path / "b", "release")
    assert latest_checkpoint_iteration(tmp_path / "b") == 0
    _legacy_tracker(tmp_path / "c", "5")
    _bridge_tracker(tmp_path / "c", 7)  # Bridge's own tracker wins
    assert latest_checkpoint_iteration(tmp_path / "c") == 7


def test_phase_order_follows_the_checkpoints(tmp_path):
    p = plan(run_dir=str(tmp_path))  # n1 = 300, N = 1000
    p1_dir, p2_dir = phase_dir(tmp_path, 1), phase_dir(tmp_path, 2)
    assert next_tst_phase(tmp_path, p) == 1 and phase2_load_dir(tmp_path, p) == p1_dir
    _bridge_tracker(p1_dir, 150)  # phase 1 interrupted
    assert next_tst_phase(tmp_path, p) == 1
    _bridge_tracker(p1_dir, 300)  # phase 1 done: the handoff
    assert next_tst_phase(tmp_path, p) == 2 and phase2_load_dir(tmp_path, p) == p1_dir
    _legacy_tracker(p2_dir, "500")  # phase 2 saved once: it resumes itself
    assert next_tst_phase(tmp_path, p) == 2 and phase2_load_dir(tmp_path, p) == p2_dir
    _bridge_tracker(p2_dir, 1000)
    assert next_tst_phase(tmp_path, p) is None


def test_s1_is_one_phase_2_launch_from_iteration_0(tmp_path):
    p = plan(TSTSettings(bag_size=1), run_dir=str(tmp_path))
    assert next_tst_phase(tmp_path, p) == 2 and phase2_load_dir(tmp_path, p) == phase_dir(tmp_path, 2)
    _bridge_tracker(phase_dir(tmp_path, 2), 1000)
    assert next_tst_phase(tmp_path, p) is None


def test_checkpoints_of_another_plan_are_refused(tmp_path):
    p = plan(run_dir=str(tmp_path))
    _bridge_tracker(phase_dir(tmp_path, 1), 400)
    with pytest.raises(ValueError, match="phase 1 ends at 300"):
        next_tst_phase(tmp_path, p)
    _bridge_tracker(phase_dir(tmp_path, 1), 300)
    _bridge_tracker(phase_dir(tmp_path, 2), 2000)
    with pytest.raises(ValueError, match=r"past the plan's end \(cfg.train.train_iters=1000\)"):
        next_tst_phase(tmp_path, p)


# ------------------------------------------------------------------------------------------
# Context-parallel split and the phase-1 loss contract
# ------------------------------------------------------------------------------------------


def test_cp_split_keeps_bags_whole_and_positions_aligned():
    s, L, cp = 2, 8, 2
    ids = torch.arange(L * s).unsqueeze(0)  # token t is bag t // s
    pos = torch.arange(L).unsqueeze(0)
    targets = torch.arange(L * 3).view(1, L, 3)
    want = {0: [0, 1, 6, 7], 1: [2, 3, 4, 5]}  # rank r: chunks r and 2cp-1-r of 4
    seen = []
    for rank in range(cp):
        out = cp_zigzag_slice({"input_ids": ids, "position_ids": pos, "targets": targets}, rank, cp)
        assert out["position_ids"][0].tolist() == want[rank]
        bags = out["input_ids"].view(1, -1, s)
        assert (bags // s == bags[..., :1] // s).all()  # no bag cut
        assert (bags[..., 0] // s == out["position_ids"]).all()  # ids follow their positions
        assert out["targets"][0].tolist() == [targets[0, i].tolist() for i in want[rank]]
        seen += want[rank]
    assert sorted(seen) == list(range(L))
    same = cp_zigzag_slice({"x": ids}, 0, 1)
    assert same["x"] is ids
    with pytest.raises(ValueError, match="2 x context_parallel_size = 4"):
        cp_zigzag_slice({"x": torch.zeros(1, 6)}, 0, 2)


@pytest.mark.parametrize("weights", [[0.25] * 4, [12 / 25, 6 / 25, 4 / 25, 3 / 25]])
def test_phase1_loss_is_the_weighted_position_sum_with_its_count(weights):
    g = torch.Generator().manual_seed(0)
    ce = torch.rand(2, 3, 4, generator=g).requires_grad_()
    mask = torch.ones(2, 3, 4)
    mask[0, 1, 2:] = 0  # last targets past the data
    mask[1, 2, :] = 0  # a position with no target
    w = torch.tensor(weights)

    loss, count, report = tst_phase1_loss(mask, w, ce)

    want, positions = 0.0, 0
    for b in range(2):
        for i in range(3):
            wm = [weights[j] * mask[b, i, j].item() for j in range(4)]
            if sum(wm) > 0:
                want += sum(wm[j] * ce[b, i, j].item() for j in range(4)) / sum(wm)
                positions += 1
    assert count.dtype == torch.int32 and count.item() == positions == 5
    torch.testing.assert_close(loss, torch.tensor(want), rtol=1e-6, atol=1e-6)
    # Bridge sums 2-element [sum, count] reports over micro-batches and DP ranks.
    assert all(v.shape == (2,) for v in report.values())
    torch.testing.assert_close(report["tst loss"], torch.tensor([want, 5.0]), rtol=1e-6, atol=1e-6)
    for j in range(4):
        plain = sum(ce[b, i, j].item() * mask[b, i, j].item() for b in range(2) for i in range(3))
        torch.testing.assert_close(
            report[f"tst loss t+{j + 1}"], torch.tensor([plain, mask[..., j].sum().item()]), rtol=1e-6, atol=1e-6
        )
    loss.backward()
    assert ce.grad is not None and ce.grad[1, 2].abs().sum() == 0


def test_phase1_loss_with_one_target_reports_no_offsets():
    ce = torch.rand(2, 3, 1)
    _, count, report = tst_phase1_loss(torch.ones(2, 3, 1), torch.ones(1), ce)
    assert count.item() == 6 and set(report) == {"tst loss"}


# ------------------------------------------------------------------------------------------
# The pre-wrap hook on a real megatron-core GPTModel (CPU)
# ------------------------------------------------------------------------------------------

VOCAB, HIDDEN, L, BATCH = 96, 32, 8, 2


def _gpt(cls=None, seed=1234):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        **cpu.MODEL_CPU_CONFIG,
    )
    return (cls or GPTModel)(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=64,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def test_hook_turns_the_built_gpt_into_the_tst_model_in_place(single_rank):
    from nemo_tst import SuperpositionConfig, SuperpositionEmbedding, TSTGPTModel, make_superposition_batch, set_superposition
    from nemo_tst.cpu import causal_attention_mask

    hooked, plain, reference = _gpt(), _gpt(), _gpt(TSTGPTModel)
    params_before = [id(p) for p in hooked.parameters()]
    assert tst_model_hook([hooked]) == [hooked]
    assert type(hooked) is TSTGPTModel and type(hooked.embedding) is SuperpositionEmbedding
    assert [id(p) for p in hooked.parameters()] == params_before  # nothing reallocated

    # Same state-dict keys, shapes and values as the plain model: phase 2 loads phase 1's.
    hooked_sd, plain_sd = hooked.state_dict(), plain.state_dict()
    assert list(hooked_sd) == list(plain_sd)
    for key, value in plain_sd.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(hooked_sd[key], value), key

    mask = causal_attention_mask(L)
    ids = torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(L).expand(BATCH, L)
    assert torch.equal(hooked(ids, pos, mask), plain(ids, pos, mask))  # phase 2: vanilla

    cfg = SuperpositionConfig(bag_size=4)
    text = torch.randint(0, VOCAB, (BATCH, cfg.sample_length(L)), generator=torch.Generator().manual_seed(2))
    batch = make_superposition_batch(text, cfg)
    outputs = []
    for model in (hooked, reference):
        set_superposition(model, cfg)
        outputs.append(model(batch.input_ids, batch.position_ids, mask, labels=batch.targets))
    assert outputs[0].shape == (BATCH, L, 4)
    assert torch.equal(outputs[0], outputs[1])  # the same phase 1 as a model built as TSTGPTModel

    assert tst_model_hook([hooked]) == [hooked]  # idempotent


def test_hook_refuses_other_model_types():
    with pytest.raises(TypeError, match="GPTModel .* HybridModel"):
        tst_model_hook([torch.nn.Linear(2, 2)])


# ------------------------------------------------------------------------------------------
# With Megatron-Bridge
# ------------------------------------------------------------------------------------------


def _recipe(tmp_path, **model_kw):
    """A small pretrain ConfigContainer assembled the way Bridge's recipes do (mock data)."""
    from megatron.bridge.models import GPTModelProvider
    from megatron.bridge.recipes.utils.optimizer_utils import distributed_fused_adam_with_cosine_annealing
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        GPTDatasetConfig,
        LoggerConfig,
        RNGConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )

    optimizer, scheduler = distributed_fused_adam_with_cosine_annealing(
        lr_warmup_iters=2, lr_decay_iters=None, max_lr=3e-4, min_lr=3e-5
    )
    scheduler.lr_decay_style = "WSD"
    scheduler.lr_wsd_decay_iters = 4
    model = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 seq_length=32, vocab_size=None, make_vocab_size_divisible_by=128)
    model.update(model_kw)
    return ConfigContainer(
        train=TrainingConfig(train_iters=40, global_batch_size=4, micro_batch_size=2),
        validation=ValidationConfig(eval_interval=20, eval_iters=2),
        model=GPTModelProvider(**model),
        optimizer=optimizer,
        scheduler=scheduler,
        dataset=GPTDatasetConfig(
            random_seed=1234, reset_attention_mask=False, reset_position_ids=False,
            eod_mask_loss=False, seq_length=32, blend=None, split="9999,8,2",
            dataloader_type="single", num_workers=0,
        ),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=256, use_tokenizer_vocab_size=True),
        checkpoint=CheckpointConfig(save=str(tmp_path / "run"), save_interval=10, ckpt_format="torch_dist"),
        rng=RNGConfig(seed=1234),
        mixed_precision="bf16_mixed",
    )


def test_phase_containers_from_a_bridge_recipe(tmp_path):
    from megatron.bridge.training.config import ConfigContainer

    cfg = _recipe(tmp_path)
    phase1, phase2 = bridge.tst_phase_configs(cfg, TSTSettings(bag_size=4, phase1_fraction=0.25))
    run = str(tmp_path / "run")

    # The recipe itself is untouched.
    assert cfg.train.exit_interval is None and cfg.checkpoint.save == run
    assert type(cfg.dataset).__name__ == "GPTDatasetConfig"
    assert isinstance(phase1, ConfigContainer) and phase1 is not cfg and phase1.model is not cfg.model

    # One schedule over both phases: iterations and scheduler identical, phase 1 exits at n1.
    assert phase1.train.train_iters == phase2.train.train_iters == 40
    assert phase1.train.exit_interval == 10 and phase2.train.exit_interval is None
    for name in ("lr_decay_style", "lr_decay_iters", "lr_wsd_decay_iters", "lr_warmup_iters", "max_steps"):
        assert getattr(phase1.scheduler, name) == getattr(phase2.scheduler, name) == getattr(cfg.scheduler, name)

    # Checkpoints: phase 1 in DIR/phase1, phase 2 resumes it (no fine-tune) into DIR/phase2.
    assert phase1.checkpoint.save == phase1.checkpoint.load == os.path.join(run, "phase1")
    assert phase2.checkpoint.save == os.path.join(run, "phase2")
    assert phase2.checkpoint.load == os.path.join(run, "phase1")
    assert not phase2.checkpoint.finetune and phase2.checkpoint.pretrained_checkpoint is None
    assert phase2.checkpoint.load_optim and phase2.checkpoint.load_rng

    # The model runs on L positions in both phases; only phase 1 converts the built model.
    assert phase1.model.seq_length == phase2.model.seq_length == 32
    assert bridge.tst_model_hook in phase1.model._pre_wrap_hooks
    assert bridge.tst_model_hook not in (getattr(phase2.model, "_pre_wrap_hooks", None) or [])

    # Data: one stream; phase-1 samples of s*L + s tokens.
    from nemo_tst.bridge import TSTDatasetProvider

    assert isinstance(phase1.dataset, TSTDatasetProvider) and phase1.dataset.tst_phase == 1
    assert phase2.dataset.tst_phase == 2
    run_plan = phase1.dataset.plan
    assert run_plan.phase1_iters == 10 and sample_tokens(run_plan) == 4 * 32 + 4
    assert item_sequence_length(run_plan) == 4 * 33 - 1
    assert phase1.dataset.base.seq_length == 32 and phase1.dataset.dataloader_type == "single"

    # Bridge writes the container into every checkpoint's run_config.yaml.
    phase1.to_yaml(str(tmp_path / "phase1.yaml"))
    phase2.to_yaml(str(tmp_path / "phase2.yaml"))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: setattr(c.train, "exit_interval", 5), r"cfg\.train\.exit_interval"),
        (lambda c: setattr(c.dataset, "dataloader_type", "cyclic"), r"cfg\.dataset\.dataloader_type"),
        (lambda c: setattr(c.model, "mtp_num_layers", 1), r"cfg\.model\.mtp_num_layers=1"),
        (lambda c: setattr(c.checkpoint, "save", None), r"cfg\.checkpoint\.save"),
        (lambda c: setattr(c.model, "context_parallel_size", 3), r"context_parallel_size"),
    ],
)
def test_bridge_settings_tst_cannot_honour_are_refused(tmp_path, change, match):
    cfg = _recipe(tmp_path)
    change(cfg)
    with pytest.raises(ValueError, match=match):
        bridge.tst_phase_configs(cfg, TSTSettings(bag_size=4))


_E2E_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests import te_absent_standin
te_absent_standin.install()
from nemo_tst import cpu
assert cpu.enable_bridge_cpu()
from pathlib import Path
from tests.test_bridge import _recipe
from nemo_tst.bridge import TSTSettings, tst_pretrain
cfg = _recipe(Path({tmp!r}))
cpu.bridge_cpu_settings(cfg)
tst_pretrain(cfg, TSTSettings(bag_size=4, phase1_fraction=0.25))
"""


def test_both_phases_bf16_distributed_optimizer_dp2(tmp_path):
    """A recipe as Bridge writes them (bf16_mixed, distributed fused Adam, mock data) on two
    data-parallel CPU ranks: the same launch twice, phase 1 exits at n1 = 10, phase 2 resumes
    it to N = 40."""
    from tests.distributed import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "run_tst.py"
    script.write_text(_E2E_SCRIPT.format(root=root, tmp=str(tmp_path)))
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", CUDA_VISIBLE_DEVICES="")
    run = tmp_path / "run"
    p = plan_tst_run(TSTSettings(bag_size=4, phase1_fraction=0.25), run_dir=str(run),
                     train_iters=40, global_batch_size=4, seq_length=32)
    for expected in (10, 40):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), str(script)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=root)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        assert latest_checkpoint_iteration(phase_dir(run, 1 if expected == 10 else 2)) == expected
        assert "lm loss" in done.stdout if expected == 40 else "tst loss" in done.stdout
    assert latest_checkpoint_iteration(phase_dir(run, 1)) == 10  # the handoff checkpoint is kept
    assert next_tst_phase(run, p) is None


def test_the_te_stand_in_reaches_only_lora_layers_and_refuses_every_use():
    """tests/te_absent_standin.py: Bridge's one unguarded Transformer Engine import gets a
    stand-in; Transformer Engine stays absent for everything else."""
    from megatron.bridge.peft import lora_layers

    from tests.te_absent_standin import AbsentTransformerEngine, installed

    assert installed()
    assert not [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]
    with pytest.raises(ImportError):
        import transformer_engine  # noqa: F401
    from megatron.core.extensions import transformer_engine as mcore_te

    assert mcore_te.HAVE_TE is False  # megatron-core's guard still sees no TE
    assert isinstance(lora_layers.te, AbsentTransformerEngine)
    for use in (lambda: lora_layers.te.ops.Sequential(), lambda: bool(lora_layers.te),
                lambda: isinstance(torch.nn.Linear(2, 2), lora_layers.te.Linear)):
        with pytest.raises(ImportError, match="Transformer Engine is absent"):
            use()
