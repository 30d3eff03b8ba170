"""The GPU argument path, built on this machine (no GPU, no Transformer Engine, no Apex).

Every shipped recipe, demo sizes included, as a pip-install GPU user runs it (`cpu=false`,
`transformer_impl=local`, bf16): its Megatron arguments are parsed by Megatron's parser,
validated by Megatron's `validate_args`, pass nemo-tst's runtime checks as on a machine with a
GPU but without TE or Apex, and give a `TransformerConfig` and a model that build. The only CPU
help is `nemo_tst.cpu`'s device stand-ins (weights created on "cuda" land on the CPU, the GPU
architecture reads as none); nothing stands in for a missing TE or Apex kernel, so an argument
that needs one fails here as it would on the GPU. The models are cut to one layer (and MoE to
eight experts) to fit this machine; every other argument is the recipe's.
"""

import pytest
import torch

from nemo_tst.recipes.catalog import load_recipe, recipe_names
from tests.distributed import run_on_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="builds the GPU path with CUDA hidden")


def _gpu_argv(name: str) -> list[str]:
    recipe = load_recipe(name, gpus=1 if name != "tst_qwen3_10b_a1b" else 8)
    smaller = ["model.num_layers=1", "parallel.num_gpus=1", "parallel.expert_model_parallel_size=1",
               "parallel.pipeline_model_parallel_size=1", "parallel.tensor_model_parallel_size=1",
               "parallel.virtual_pipeline_model_parallel_size=null"]
    if recipe.model.num_experts:
        smaller += ["model.num_experts=8"]
    recipe = load_recipe(name, gpus=recipe.parallel.num_gpus, overrides=[
        "cpu=false", "transformer_impl=local", *smaller])
    return recipe.megatron_args()


def _build_gpu_path(rank, world_size, name, argv):
    import megatron.training.global_vars as global_vars
    from megatron.core import parallel_state
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import validate_args

    from nemo_tst import cpu
    from nemo_tst.superposition import TSTGPTModel
    from nemo_tst.training import arguments
    from nemo_tst.training.arguments import parse_megatron_args
    from nemo_tst.training.pretrain import model_provider

    assert "--tst-cpu" not in argv and "--use-cpu-initialization" not in argv, name
    cpu.enable_megatron_cpu()  # device stand-ins only: "cuda" tensors on CPU, no GPU architecture
    args = parse_megatron_args(argv)
    args.rank, args.world_size = 0, 1
    validate_args(args, {})
    arguments.plan_from_args(args)
    real_is_available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # check_runtime as on a GPU machine without TE/Apex
    try:
        arguments.check_runtime(args)
    finally:
        torch.cuda.is_available = real_is_available
    args.padded_vocab_size = args.vocab_size
    global_vars._GLOBAL_ARGS = args
    config = core_transformer_config_from_args(args)
    assert config.apply_rope_fusion is False and config.gradient_accumulation_fusion is False, name
    parallel_state.initialize_model_parallel(1, 1)
    cpu.seed_model_parallel(args.seed)
    model = model_provider(config=config)
    assert isinstance(model, TSTGPTModel), name
    assert sum(p.numel() for p in model.parameters()) > 0
    assert next(model.parameters()).dtype == torch.bfloat16, name  # the recipe's bf16 params
    parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_builds_on_the_gpu_path_without_te_or_apex(name):
    run_on_ranks(_build_gpu_path, 1, name, _gpu_argv(name))
