"""One phase of a TST run on Megatron-LM's trainer (`megatron.training.pretrain`).

This is what each rank runs (`torchrun ... -m nemo_tst.training.pretrain <megatron args>
--tst-phase 1|2`); `nemo_tst.training.driver` chains the phases and resumes. It mirrors
Megatron-LM's `pretrain_gpt.py` (parse args -> model provider -> datasets provider -> pretrain)
with three substitutions: the model is a `TSTGPTModel` / `TSTHybridModel`, training data is
the phase-aware `TSTTrainDataset`, and forward_step handles both phases.

Both phases get the same Megatron arguments (`--train-iters` = N, one LR schedule); phase 1
adds `--exit-interval n1`, on which Megatron saves a checkpoint and exits. At s = 1 there is
no phase 1: `--tst-phase 2` trains all N iterations (phase 1's iterations take its code path
with bags of one token, i.e. ordinary training) and `--tst-phase 1` exits at once.

For one process the driver starts this module without torchrun, with the environment torchrun
would set (RANK, WORLD_SIZE, MASTER_ADDR, ...); Slurm and NeMo-Run start it through torchrun.
"""

import logging
import sys
from functools import partial

import torch

__all__ = ["main", "model_provider", "train_valid_test_datasets_provider"]


def _early_options(argv: list[str]):
    """`--tst-cpu` and `--tokenizer-type`, read before Megatron's own parser runs (which is
    after megatron.training has built state the CPU patches must precede), with argparse's
    rules: the last value wins."""
    import argparse

    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--tst-cpu", action="store_true")
    early.add_argument("--tokenizer-type", default=None)
    return early.parse_known_args(argv)[0]


def _enable_cpu_if_requested(argv: list[str]) -> None:
    """`--tst-cpu`: patch Megatron for CPU and gloo (nemo_tst/cpu.py). A rank that sees a GPU
    refuses: the CPU stand-ins would run beside a real CUDA runtime, a mix nothing tests
    (`nemo-tst pretrain --tst-cpu` hides the GPUs from its ranks)."""
    wanted = _early_options(argv)
    if not wanted.tst_cpu:
        return
    if torch.cuda.is_available():
        raise ValueError(
            "--tst-cpu runs Megatron on CPU, but this rank sees a CUDA GPU: hide it "
            "(CUDA_VISIBLE_DEVICES= ) to train on CPU, or drop --tst-cpu to train on the GPU"
        )
    from nemo_tst import cpu

    if wanted.tokenizer_type == "NullTokenizer" and "transformers" not in sys.modules:
        # A NullTokenizer needs no Hugging Face code, but megatron's tokenizer registry
        # imports every text tokenizer library, transformers included (about 1.2 s of a
        # CPU launch); each of those imports is guarded, so this rank treats it as absent.
        sys.modules["transformers"] = None
    cpu.enable_megatron_cpu()


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """A `TSTGPTModel` (dense or MoE) from Megatron's arguments, like pretrain_gpt's builder;
    with --hybrid-layer-pattern a `TSTHybridModel`, like pretrain_hybrid's."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.training import get_args
    from megatron.training.argument_utils import core_transformer_config_from_args

    from nemo_tst.attention import get_gpt_decoder_block_sdpa_spec, get_gpt_layer_sdpa_spec
    from nemo_tst.superposition import TSTGPTModel

    args = get_args()
    config = config if config is not None else core_transformer_config_from_args(args)
    use_te = args.transformer_impl == "transformer_engine"
    # With --transformer-impl local, core attention is torch SDPA (nemo_tst.attention) unless
    # --tst-attention unfused asks for Megatron's DotProductAttention (for comparison).
    sdpa = args.transformer_impl == "local" and getattr(args, "tst_attention", "sdpa") == "sdpa"
    common = _language_model_arguments(args, config, pre_process=pre_process, post_process=post_process,
                                       vp_stage=vp_stage, pg_collection=pg_collection)
    if args.hybrid_layer_pattern is not None:
        return _hybrid_model(args, common, use_te=use_te, sdpa=sdpa)
    if args.num_experts and sdpa:
        spec = get_gpt_decoder_block_sdpa_spec(config, normalization=args.normalization, vp_stage=vp_stage)
    elif args.num_experts:
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=args.normalization, vp_stage=vp_stage
        )
    elif use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    elif sdpa:
        spec = get_gpt_layer_sdpa_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    return TSTGPTModel(transformer_layer_spec=spec, rope_scaling=args.use_rope_scaling,
                       rope_scaling_factor=args.rope_scaling_factor, **common)


def _language_model_arguments(args, config, **stage) -> dict:
    """The constructor arguments `GPTModel` and `HybridModel` share, from Megatron's arguments
    (`stage`: pre_process, post_process, vp_stage, pg_collection)."""
    return dict(
        config=config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        **stage,
    )


def _hybrid_model(args, common: dict, *, use_te, sdpa):
    """A `TSTHybridModel` of Megatron's TE hybrid layers (`hybrid_stack_spec`: every layer type
    of the pattern) with --transformer-impl transformer_engine; with local layers, the attention
    and MLP layers of the GPT spec above (SDPA core attention unless --tst-attention unfused),
    the only layer types the pattern may then name. HybridStack's final norm is TE's TENorm
    either way (checked before launch: `arguments.check_runtime`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_tst.attention import get_gpt_layer_sdpa_spec
    from nemo_tst.superposition.model import (
        TSTHybridModel,
        check_transformer_pattern,
        hybrid_stack_spec_from_gpt_layer,
    )

    if use_te:
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as spec
    else:
        check_transformer_pattern(args.hybrid_layer_pattern, "--transformer-impl local")
        layer = (get_gpt_layer_sdpa_spec if sdpa else get_gpt_layer_local_spec)(
            qk_layernorm=args.qk_layernorm, normalization=args.normalization
        )
        spec = hybrid_stack_spec_from_gpt_layer(layer)
    return TSTHybridModel(hybrid_stack_spec=spec, hybrid_layer_pattern=args.hybrid_layer_pattern, **common)


def _is_dataset_built_on_rank(vp_stage=None):
    """Where get_batch reads data: TP rank 0 of the first and last pipeline stages."""
    from megatron.core import parallel_state
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return (
        is_first_or_last_pipeline_stage(vp_stage)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


HELD_OUT_SEED = 1234
"""The seed that orders the held-out (validation and test) samples, whatever `--seed` is
(Megatron's default seed): runs of different seeds are scored on the same held-out text, so
their losses compare. `--seed` still sets the weights and the order of the training data."""


def _gpt_dataset_config(args, sequence_length, tokenizer, seed):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=sequence_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )


class SameSamplesEachEvaluation(torch.utils.data.Dataset):
    """The first `per_evaluation` held-out samples, repeated to the length Megatron asked for.

    Megatron's validation sampler starts at `consumed_valid_samples`, which grows by one
    evaluation's worth each time (and survives resumes). Repeating one evaluation's samples
    makes every evaluation read the same held-out text, so the points of a curve, and the
    curves of two runs, compare.
    """

    def __init__(self, dataset, per_evaluation: int, length: int):
        self.dataset = dataset
        self.per_evaluation = min(per_evaluation, len(dataset))
        self.length = max(length, self.per_evaluation)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % self.per_evaluation]


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None, *, plan, tokenizer):
    """Training: `TSTTrainDataset` over items; validation/test: ordinary next-token data,
    validation fixed to the first eval_iters x global batch held-out samples.

    Bind `plan` and `tokenizer` with functools.partial (see `main`)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.training import get_args, print_rank_0

    from nemo_tst.core.data import TSTTrainDataset, item_sequence_length, items_needed

    args = get_args()
    built_on_rank = partial(_is_dataset_built_on_rank, vp_stage=vp_stage)
    _, valid_n, test_n = train_val_test_num_samples

    # Two builds: training items are s*(L+1)-ish tokens long, held-out samples L+1. The split a
    # build does not need is asked for 1 sample, not None: Megatron refuses a size of None for
    # a weighted blend (`--data-path 0.3 A 0.7 B`).
    items, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [items_needed(plan), 1, 1], built_on_rank,
        _gpt_dataset_config(args, item_sequence_length(plan), tokenizer, args.seed),
    ).build()
    # Validation reads one evaluation's samples each time, so only that many are asked for:
    # asking for valid_n (which grows with --train-iters) would let runs of different lengths
    # draw different held-out samples once valid_n passes one epoch of the held-out data
    # (GPTDataset then shuffles documents over two epochs).
    per_evaluation = args.eval_iters * args.global_batch_size
    _, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [1, min(valid_n, per_evaluation) if valid_n else valid_n, test_n], built_on_rank,
        _gpt_dataset_config(args, args.seq_length, tokenizer, HELD_OUT_SEED),
    ).build()

    if valid is not None:
        valid = SameSamplesEachEvaluation(valid, per_evaluation, valid_n)

    train = None
    if items is not None:  # the corpus budget was checked by the driver, before launch
        train = TSTTrainDataset(items, plan)
        print_rank_0(
            f"> TST data: phase 1 = samples [0, {plan.phase1_samples}) of "
            f"{plan.superposition.sample_length(plan.seq_length)} tokens, phase 2 = "
            f"{plan.seq_length + 1}-token pieces of the following items"
        )
    return train, valid, test


def main(argv: list[str] | None = None) -> None:
    """Run one phase (`--tst-phase 1` or `2`) with Megatron's trainer, on this rank."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:  # Megatron's own help crashes on one of its help strings
        from nemo_tst.training.arguments import help_text

        print(help_text("python -m nemo_tst.training.pretrain", megatron=True))
        return
    from nemo_tst.megatron_fixes import apply_megatron_fixes

    apply_megatron_fixes()
    _enable_cpu_if_requested(argv)

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from nemo_tst.data.tokenizer import HFTokenizer
    from nemo_tst.training import faults
    from nemo_tst.training.arguments import add_tst_arguments, check_runtime, plan_from_args
    from nemo_tst.training.driver import resolve_phase_start
    from nemo_tst.training.step import ProgressLog, forward_step

    sys.argv = [sys.argv[0]] + argv
    args = parse_and_validate_args(extra_args_provider=add_tst_arguments)
    if args.tst_phase not in ("1", "2"):
        raise ValueError(
            "nemo_tst.training.pretrain runs one phase: pass --tst-phase 1 or 2, or use "
            "`nemo-tst pretrain` to run both"
        )
    plan = plan_from_args(args)
    check_runtime(args)
    nothing_to_do = resolve_phase_start(args, plan)
    if nothing_to_do:
        print(f"[nemo-tst] {nothing_to_do}", flush=True)
        return
    if args.tst_tokenizer is None:
        raise ValueError("--tst-tokenizer (the tokenizer.json used to preprocess the data) is required")
    lock = _lock_run_directory(args)  # noqa: F841 -- held (by global rank 0) until this process ends
    tokenizer = HFTokenizer.from_file(args.tst_tokenizer)

    # The plan and tokenizer are bound here, not stored on Megatron's args: args are pickled
    # into every checkpoint, and a checkpoint must load with plain Megatron (no nemo_tst).
    datasets_provider = partial(train_valid_test_datasets_provider, plan=plan, tokenizer=tokenizer)
    datasets_provider.is_distributed = True
    pretrain(
        pretrain_cfg_container_from_args(args),
        datasets_provider,
        ModelType.encoder_or_decoder,
        faults.install(partial(forward_step, plan=plan, eod_id=tokenizer.eod, progress=ProgressLog(plan))),
        model_provider,
    )


def _lock_run_directory(args):
    """Global rank 0 of a stage launched without `nemo-tst pretrain` (NeMo-Run, Slurm: every
    rank runs this module) takes the run directory's lock for its lifetime, so a second
    submission of the same run refuses while this one trains (`RunLock`). Ranks the
    driver launched inherit its lock and take none."""
    import os

    from nemo_tst.core.run_dir import RunDirectory
    from nemo_tst.core.run_lock import LOCK_HELD_ENV, RunLock
    from nemo_tst.training.arguments import MEGATRON_NAMES

    run_directory = RunDirectory.of_phase_dir(args.save) if args.save else None
    if run_directory is None or os.environ.get(LOCK_HELD_ENV):
        return None
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    return RunLock(run_directory.root).acquire(MEGATRON_NAMES)


def _end_rank(code) -> None:
    """End a CPU rank (`--tst-cpu`) that finished cleanly without the interpreter's teardown.

    Tearing down torch, megatron and inductor objects costs about 2 s of CPU per launch and
    does nothing for the run: the checkpoint and its tracker are on disk, the output is
    flushed, and with synchronous saves no helper process waits on this one. All ranks meet
    at a barrier first, so none leaves while another still exchanges with it. Runs on GPUs,
    and asynchronous saves (whose writer process finishes at exit), exit the usual way."""
    import os

    import torch.distributed as dist
    from megatron.training import get_args

    try:
        args = get_args()
    except Exception:  # main() returned before Megatron set its arguments (nothing to do)
        args = None
    if args is not None and getattr(args, "async_save", False):
        sys.exit(code)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    on_cpu = _early_options(sys.argv[1:]).tst_cpu  # main() rewrites sys.argv
    try:
        main()
    except SystemExit as stop:  # Megatron's own exit (--exit-interval, exit signal, duration)
        if stop.code not in (None, 0) or not on_cpu:
            raise
    if on_cpu:
        _end_rank(0)
