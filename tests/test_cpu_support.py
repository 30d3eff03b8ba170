"""nemo_tst.cpu: Megatron-Core on CPU with gloo (opt-in patches).

Distributed cases run in spawned processes so the pytest process never joins a process group.
"""

import importlib
import inspect
import os

import pytest
import torch

from nemo_tst import cpu
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU support tests patch Megatron only when CUDA is absent"
)

VOCAB, SEQ, BATCH = 96, 16, 2


def _build_and_step(tp: int, ep: int, moe: bool, pp: int = 1) -> dict:
    """Build a tiny GPTModel (local spec, rope) on this rank and run one forward+backward
    (through Megatron's pipeline schedule when pp > 1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from megatron.core.pipeline_parallel import get_forward_backward_func

    ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    cpu.seed_model_parallel(1234)
    moe_kwargs = {}
    if moe:
        moe_kwargs = dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=1e-2,
            add_bias_linear=False,
        )
    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        expert_model_parallel_size=ep,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        **moe_kwargs,
    )
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = cpu.causal_attention_mask(SEQ)
    if pp == 1:
        loss = model(ids, positions, mask, labels=labels).mean()  # per-token CE [b, s]
        loss.backward()
        loss = loss.item()
    else:

        def forward_step(data_iterator, model):
            output = model(ids, positions, mask, labels=labels)
            return output, lambda out: (out.mean(), {"loss": out.mean().detach()})

        model.config.finalize_model_grads_func = None
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=None,
            model=[model],
            num_microbatches=2,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=False,
        )
        loss = losses[0]["loss"].item() if ps.is_pipeline_last_stage() else float("nan")
    out = {
        "loss": loss,
        "all_grads_finite": all(
            torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None
        ),
        "has_grads": any(p.grad is not None for p in model.parameters()),
    }
    if ps.is_pipeline_last_stage():
        # Replicated across TP ranks: the same gradient at any TP size.
        out["norm_grad"] = model.decoder.final_layernorm.weight.grad.clone()
    ps.destroy_model_parallel()
    return out


def _worker(rank: int, world_size: int, cases: list, out_dir: str) -> None:
    assert cpu.enable_megatron_cpu(trainer=False)
    results = {case: _build_and_step(*case) for case in cases}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn(world_size: int, cases: list, tmp_path) -> list[dict]:
    run_on_ranks(_worker, world_size, cases, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """TP=1 dense and MoE (allgather dispatcher) results at world size 1."""
    return _spawn(1, [(1, 1, False), (1, 1, True)], tmp_path_factory.mktemp("ws1"))[0]


@pytest.fixture
def cpu_patches_off():
    """Run with the patches off, then put back whatever state other tests left them in."""
    was_enabled, had_trainer = cpu.is_enabled(), cpu._TRAINER_ENABLED
    cpu.disable_megatron_cpu()
    yield
    cpu.disable_megatron_cpu()
    if was_enabled:
        cpu.enable_megatron_cpu(trainer=had_trainer)


def test_enable_is_idempotent_keeps_originals_and_disables(cpu_patches_off):
    import megatron.core.tensor_parallel.random as mrandom
    import megatron.training.initialize as minit
    import megatron.training.training as mtraining
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer.module import MegatronModule

    originals = {
        "get_rng": mrandom._get_cuda_rng_state,
        "init": minit.initialize_megatron,
        "init_in_training": mtraining.initialize_megatron,
        "clip": clip_grads.clip_grad_by_total_norm_fp32,
    }
    assert "cuda" not in vars(MegatronModule)

    assert cpu.enable_megatron_cpu()
    patched = {
        "get_rng": mrandom._get_cuda_rng_state,
        "init": minit.initialize_megatron,
        "init_in_training": mtraining.initialize_megatron,
        "clip": clip_grads.clip_grad_by_total_norm_fp32,
    }
    view = rotary_pos_embedding.torch
    assert cpu.enable_megatron_cpu()  # second call: nothing changes
    assert mrandom._get_cuda_rng_state is patched["get_rng"]
    assert minit.initialize_megatron is patched["init"]
    assert rotary_pos_embedding.torch is view
    for key, fn in patched.items():
        assert fn is not originals[key] and fn.__wrapped__ is originals[key], key
    assert view.__wrapped__ is torch
    assert MegatronModule.cuda.__wrapped__ is torch.nn.Module.cuda

    # Only Megatron's view of torch changes, never torch itself.
    assert view.cuda.current_device() == torch.device("cpu")
    assert view.empty(2, device="cuda").device.type == "cpu"
    assert view.device("cuda", 1) == torch.device("cpu")
    assert isinstance(torch.device("cpu"), view.device)
    with pytest.raises(RuntimeError):
        torch.cuda.current_device()

    cpu.disable_megatron_cpu()
    assert not cpu.is_enabled()
    assert rotary_pos_embedding.torch is torch
    for key, fn in originals.items():
        current = {
            "get_rng": mrandom._get_cuda_rng_state,
            "init": minit.initialize_megatron,
            "init_in_training": mtraining.initialize_megatron,
            "clip": clip_grads.clip_grad_by_total_norm_fp32,
        }[key]
        assert current is fn, key
    assert "cuda" not in vars(MegatronModule)


def missing_megatron_names(names) -> list[str]:
    """The names of `names` ("module:qualified.name", "(param)" for a keyword of a callable)
    that the installed megatron-core lacks."""
    missing = []
    for target in names:
        module_name, _, path = target.partition(":")
        path, _, param = path.partition("(")
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            missing.append(target)
            continue
        for part in path.split("."):
            if not hasattr(obj, part):
                missing.append(target)
                break
            obj = getattr(obj, part)
        else:
            if param and param.rstrip(")") not in inspect.signature(obj).parameters:
                missing.append(target)
    return missing


def test_every_patched_megatron_name_exists(cpu_patches_off):
    """Every attribute nemo_tst.cpu replaces or relies on is still in the installed
    megatron-core: a renamed or moved name fails here, not deep inside a CPU run."""
    assert len(cpu.MEGATRON_NAMES) == len(set(cpu.MEGATRON_NAMES))
    assert {p.target for p in cpu._PATCHES if not p.bridge} <= set(cpu.MEGATRON_NAMES)
    assert missing_megatron_names(cpu.MEGATRON_NAMES) == []


# Every patch nemo_tst.cpu makes, with the device it stands in for. A patch that is not a stand-in
# for the device (CUDA calls, NCCL, the CUDA RNG, streams) or for an absent Transformer Engine
# belongs on the path every launch takes (nemo_tst.megatron_fixes), not here.
CUDA_CALLS = "CUDA calls: current_device(), tensors made on 'cuda', synchronize, memory statistics"
CUDA_TENSORS = "CUDA tensors: .cuda() and .type() == 'torch.cuda.FloatTensor' on CPU tensors"
CPU_PATCH_REASONS = {
    **{f"{module}:torch": CUDA_CALLS for module in (
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "megatron.core.pipeline_parallel.p2p_communication",
        "megatron.core.pipeline_parallel.schedules",
        "megatron.core.tensor_parallel.data",
        "megatron.core.tensor_parallel.layers",
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.transformer.dot_product_attention",
        "megatron.core.transformer.moe.router",
        "megatron.core.transformer.utils",
        "megatron.core.utils",
        "megatron.core.dist_checkpointing.strategies.fully_parallel",
        "megatron.core.dist_checkpointing.exchange_utils",
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.grad_scaler",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
        "megatron.core.timers",
        "megatron.training.utils.common_utils",
    )},
    **{f"{module}:torch": "CUDA streams and events (and CUDA calls)" for module in (
        "megatron.core.transformer.moe.token_dispatcher",
        "megatron.core.dist_checkpointing.strategies.async_utils",
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "megatron.core.distributed.distributed_data_parallel",
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.training.training",
    )},
    **{f"{module}:torch": "the CUDA RNG state (and CUDA calls)" for module in (
        "megatron.core.tensor_parallel.random",
        "megatron.core.rerun_state_machine",
        "megatron.training.checkpointing",
    )},
    "megatron.training.initialize:torch": "a device count of 1: model-parallel init and RNG seeding skip 0",
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state": "the CUDA RNG",
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state": "the CUDA RNG",
    "megatron.training.initialize:initialize_megatron": "asserts a CUDA device",
    "megatron.training.training:initialize_megatron": "asserts a CUDA device",
    "megatron.training.utils.common_utils:get_device_arch_version": "reads the GPU's architecture",
    "megatron.training.arguments:get_device_arch_version": "reads the GPU's architecture",
    "megatron.training.utils:get_device_arch_version": "reads the GPU's architecture",
    "megatron.training.initialize:_warmup_jit_function": "its warm-up tensors are made on 'cuda'",
    "megatron.core.transformer.module:MegatronModule.cuda": "moves the model to the GPU",
    "megatron.core.models.hybrid.hybrid_block:TENorm":
        "an absent Transformer Engine: HybridStack builds its final norm with TE's TENorm",
    # Megatron-Bridge's trainer (cpu.enable_bridge_cpu)
    **{f"{module}:torch": CUDA_CALLS for module in (
        "megatron.bridge.training.train",
        "megatron.bridge.training.eval",
        "megatron.bridge.training.utils.train_utils",
        "megatron.bridge.training.setup",
        "megatron.bridge.data.loaders",
        "megatron.bridge.models.model_provider",
    )},
    "megatron.bridge.training.checkpointing:torch": "the CUDA RNG state (and CUDA calls)",
    "megatron.training.models.dist_utils:torch": "CUDA streams and events (and CUDA calls)",
    "megatron.bridge.training.initialize:torch": "a device count of 1: RNG seeding skips 0",
    "megatron.bridge.training.initialize:initialize_megatron": "asserts a CUDA device",
    "megatron.bridge.training.setup:initialize_megatron": "asserts a CUDA device",
    "megatron.bridge.training.initialize:_warmup_jit_function": "its warm-up tensors are made on 'cuda'",
    "megatron.bridge.training.gpt_step:get_batch_from_iterator": CUDA_TENSORS,
    "megatron.bridge.training.eval:evaluate": CUDA_TENSORS,
    **{target: CUDA_TENSORS for target in (
        "megatron.core.models.common.language_module.language_module:"
        "LanguageModule.setup_embeddings_and_output_layer",
        "megatron.core.tensor_parallel.data:broadcast_data",
        "megatron.core.tensor_parallel:broadcast_data",
        "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
        "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
        "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
        "megatron.core.dist_checkpointing.exchange_utils:exchange_loaded_tensors_gather_rounds",
        "megatron.core.dist_checkpointing.exchange_utils:exchange_loaded_tensors_broadcast",
        "megatron.core.utils:check_param_hashes_across_dp_replicas",
        "megatron.training.training:check_param_hashes_across_dp_replicas",
    )},
}


def test_every_patched_megatron_bridge_name_exists(cpu_patches_off):
    """Every Megatron-Bridge attribute nemo_tst.cpu replaces or relies on is still in the
    installed Megatron-Bridge (the `bridge` extra; see tests/te_absent_standin.py)."""
    from tests import te_absent_standin

    te_absent_standin.install()
    assert len(cpu.BRIDGE_CPU_NAMES) == len(set(cpu.BRIDGE_CPU_NAMES))
    assert {p.target for p in cpu._PATCHES if p.bridge} <= set(cpu.BRIDGE_CPU_NAMES)
    assert not set(cpu.BRIDGE_CPU_NAMES) & set(cpu.MEGATRON_NAMES)
    assert missing_megatron_names(cpu.BRIDGE_CPU_NAMES) == []


def test_every_cpu_patch_stands_in_for_the_device():
    """The patches nemo_tst.cpu makes are exactly those listed above, each with its device
    reason: a new patch must say what device call it replaces."""
    patched = [p.target for p in cpu._PATCHES]
    assert len(patched) == len(set(patched))
    assert sorted(patched) == sorted(CPU_PATCH_REASONS)


def test_a_missing_megatron_name_is_reported():
    made_up = [
        "megatron.core.utils:no_such_function",
        "megatron.core.no_such_module:anything",
        "megatron.core.transformer.module:MegatronModule.no_such_method",
        "megatron.training.initialize:initialize_megatron(no_such_keyword)",
    ]
    assert missing_megatron_names(made_up + ["megatron.core.utils:torch"]) == made_up


def _signature_mismatches(replacement, original) -> list[str]:
    """How a call that fits `original` could fail to fit `replacement` (empty: none)."""
    P = inspect.Parameter
    positional = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    rep = inspect.signature(replacement, follow_wrapped=False).parameters
    org = inspect.signature(original, follow_wrapped=False).parameters
    rep_kinds = {p.kind for p in rep.values()}
    org_positional = [n for n, p in org.items() if p.kind in positional]
    rep_positional = [n for n, p in rep.items() if p.kind in positional]
    problems = []
    prefix = rep_positional[: len(org_positional)]
    if P.VAR_POSITIONAL not in rep_kinds and prefix != org_positional:
        problems.append(f"positional parameters {org_positional} became {rep_positional}")
    for name, p in org.items():
        if p.kind is P.KEYWORD_ONLY and name not in rep and P.VAR_KEYWORD not in rep_kinds:
            problems.append(f"keyword {name!r} dropped")
        if p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and p.kind not in rep_kinds:
            problems.append(f"{p} dropped")
    for name, p in rep.items():
        required = p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
        if required and name not in org:
            problems.append(f"requires {name!r}, which the original does not take")
    return problems


def test_replacement_functions_accept_the_originals_calls(cpu_patches_off):
    """Each replacement (nemo_tst.cpu's and nemo_tst.megatron_fixes') takes whatever its
    original takes, so a Megatron signature change (a new required argument, a renamed
    keyword) shows here."""
    from nemo_tst import megatron_fixes

    checked = 0
    for p in cpu._PATCHES + megatron_fixes._PATCHES:
        owner, name = megatron_fixes.resolve(p.target)
        original = getattr(owner, name)
        replacement = p.make(original)
        if callable(original) and inspect.isfunction(replacement):
            assert _signature_mismatches(replacement, original) == [], p.target
            checked += 1
    assert checked > 20
    made_up = lambda self, extra: None  # noqa: E731 - a replacement that needs one more argument
    assert _signature_mismatches(made_up, torch.nn.Module.cuda)


def test_tensor_methods_are_swapped_only_inside_patched_calls(cpu_patches_off):
    cpu.enable_megatron_cpu(trainer=False)
    t = torch.zeros(2)
    with cpu._cpu_tensors_pass_as_cuda():
        assert t.cuda() is t and t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64
    assert t.type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        t.cuda()


def test_refuses_when_cuda_is_available(cpu_patches_off, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.enable_megatron_cpu() is False
    assert not cpu.is_enabled()


def test_causal_attention_mask():
    mask = cpu.causal_attention_mask(4)
    assert mask.shape == (1, 1, 4, 4) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], torch.ones(4, 4, dtype=torch.bool).triu(1))


def test_gpt_forward_backward_single_rank(single_rank):
    for case in [(1, 1, False), (1, 1, True)]:
        result = single_rank[case]
        assert torch.isfinite(torch.tensor(result["loss"]))
        assert abs(result["loss"] - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0
        assert result["all_grads_finite"]


def test_tp2_matches_tp1_and_moe_ep2_and_pp2_run(single_rank, tmp_path):
    ranks = _spawn(2, [(2, 1, False), (1, 2, True), (1, 1, False, 2)], tmp_path)
    reference = single_rank[(1, 1, False)]
    for result in (r[(2, 1, False)] for r in ranks):
        torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            result["norm_grad"], reference["norm_grad"], rtol=1e-4, atol=1e-5
        )
    for result in (r[(1, 2, True)] for r in ranks):
        assert torch.isfinite(torch.tensor(result["loss"])) and result["all_grads_finite"]
    pp_first, pp_last = (r[(1, 1, False, 2)] for r in ranks)  # ranks 0 and 1 = stages 0 and 1
    assert torch.isfinite(torch.tensor(pp_last["loss"]))
    for stage in (pp_first, pp_last):
        assert stage["has_grads"] and stage["all_grads_finite"]
