"""Recipes (conf/recipes, presets, overrides), their validation, and `nemo-tst plan`."""

import json

import pytest

from nemo_tst.cli import main
from nemo_tst.recipes import check_recipe, load_recipe, plan_report, recipe_names
from nemo_tst.conf import read_conf, recipe_files
from nemo_tst.recipes.catalog import precision_names

PAPER_SCALES = ["tst_llama3_270m", "tst_llama3_600m", "tst_smollm3_3b", "tst_qwen3_10b_a1b"]


def test_the_paper_scales_and_presets_are_there():
    assert set(PAPER_SCALES) | {"tst_tiny"} <= set(recipe_names())
    assert {"bf16", "fp8_delayed", "fp8_current", "mxfp8"} <= set(precision_names())
    for name in PAPER_SCALES:
        for gpus in (8, 64):
            recipe = load_recipe(name, gpus=gpus)
            assert recipe.parallel.num_gpus == gpus
            args, plan = check_recipe(recipe, local=False)  # Megatron's parser + our checks
            assert args.num_layers == recipe.model.num_layers
            assert plan.train_iters == recipe.training.train_iters


@pytest.mark.parametrize("name, s, n1, N, lr, tokens_per_step", [
    # paper-facts: dense s=6 r=0.3 over 20k steps at 2M tokens/step; MoE s=16, 12,483 of 49,983
    # steps at 8M tokens/step; LRs 2e-3, 1e-3, 2e-4, 3e-4.
    ("tst_llama3_270m", 6, 6000, 20000, 2e-3, 2 * 2**20),
    ("tst_llama3_600m", 6, 6000, 20000, 1e-3, 2 * 2**20),
    ("tst_smollm3_3b", 6, 6000, 20000, 2e-4, 2 * 2**20),
    ("tst_qwen3_10b_a1b", 16, 12483, 49983, 3e-4, 8 * 2**20),
])
def test_recipes_carry_the_paper_settings(name, s, n1, N, lr, tokens_per_step):
    recipe = load_recipe(name)
    _, plan = check_recipe(recipe, local=False)
    assert (plan.superposition.bag_size, plan.phase1_iters, plan.train_iters) == (s, n1, N)
    assert recipe.training.lr == lr
    assert recipe.training.global_batch_size * recipe.model.seq_length == tokens_per_step
    args = recipe.megatron_args()
    assert args[args.index("--lr-decay-style") + 1] == "WSD"
    assert args[args.index("--lr-warmup-iters") + 1] == "2000"
    assert args[args.index("--lr-wsd-decay-iters") + 1] == str(round(0.1 * N))  # last 10%


def test_published_shapes():
    """The numbers of the configs the recipes cite (SmolLM2-135M/-360M, SmolLM3-3B)."""
    shape = lambda n: load_recipe(n).model  # noqa: E731
    m = shape("tst_llama3_270m")
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
            m.vocab_size, m.untie_embeddings) == (30, 576, 1536, 9, 3, 128256, True)
    m = shape("tst_llama3_600m")
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups) == (32, 960, 2560, 15, 5)
    m = shape("tst_smollm3_3b")
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups, m.vocab_size) == (36, 2048, 11008, 16, 4, 128256)
    total, active = shape("tst_qwen3_10b_a1b").parameters()
    assert 9.5e9 < total < 10.5e9 and 0.9e9 < active < 1.1e9  # "10B-A1B"


def _built_parameter_count(recipe) -> int:
    """Parameters of the megatron-core model the trainer would build for this shape."""
    import torch
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from nemo_tst import TSTGPTModel, cpu

    m = recipe.model
    cpu.seed_model_parallel(0)
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        qk_layernorm=m.qk_layernorm, num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk, moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_token_dispatcher_type="allgather", **cpu.MODEL_CPU_CONFIG,
    )
    spec = get_gpt_layer_local_spec(num_experts=m.num_experts, qk_layernorm=m.qk_layernorm,
                                    normalization="RMSNorm")
    model = TSTGPTModel(config=config, transformer_layer_spec=spec, vocab_size=m.vocab_size,
                        max_sequence_length=m.seq_length, position_embedding_type="rope",
                        share_embeddings_and_output_weights=not m.untie_embeddings)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("overrides", [
    [],                                                         # the tiny dense recipe
    ["model.num_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=48",
     "model.qk_layernorm=true", "model.kv_channels=32", "model.untie_embeddings=false"],
])
def test_parameter_count_matches_the_built_model(overrides, single_rank):
    recipe = load_recipe("tst_tiny", overrides=overrides)
    total, active = recipe.model.parameters()
    assert total == _built_parameter_count(recipe)
    if recipe.model.num_experts:
        m = recipe.model
        assert total - active == (m.num_experts - m.moe_router_topk) * 3 * m.hidden_size * \
            m.moe_ffn_hidden_size * m.num_layers
    else:
        assert total == active


def test_flops_per_position_formula():
    m = load_recipe("tst_llama3_270m").model
    h, L, layers, V = m.hidden_size, m.seq_length, m.num_layers, m.vocab_size
    d = h // m.num_attention_heads
    per_layer = h * h * 2 + h * (3 * d) * 2 + 3 * h * m.ffn_hidden_size  # q,o + k,v + SwiGLU
    expected = 6 * (layers * per_layer + V * h) + 6 * layers * L * h
    assert m.training_flops_per_position() == expected + 6 * (layers * 2 * h + h)  # + norms


def test_plan_tokens_flops_and_data_budget():
    recipe = load_recipe("tst_llama3_270m", gpus=64)
    report = plan_report(recipe, corpus_tokens=50_000_000_000)
    N, B, L, s, n1 = 20000, 1024, 2048, 6, 6000
    assert [p["iterations"] for p in report["phases"]] == [n1, N - n1]
    assert report["phases"][0]["text_tokens"] == n1 * B * s * L
    assert report["phases"][1]["text_tokens"] == (N - n1) * B * L
    assert report["baseline_equal_flops"]["text_tokens"] == N * B * L  # paper: 42B
    assert report["total"]["text_tokens"] == pytest.approx((1 + (s - 1) * 0.3) * N * B * L)  # 105B
    assert report["total"]["flops"] == report["baseline_equal_flops"]["flops"]
    assert report["data"]["verdict"].startswith("data-bound")
    assert plan_report(recipe, corpus_tokens=200_000_000_000)["data"]["verdict"].startswith("enough")
    # GPU-hours from MFU, and from a measured throughput
    flops = report["total"]["flops"]
    assert report["estimate"]["gpu_hours"] == pytest.approx(flops / (0.4 * 989e12) / 3600)
    measured = plan_report(recipe, tokens_per_gpu_second=100_000)
    assert measured["estimate"]["gpu_hours"] == pytest.approx(N * B * L / 100_000 / 3600)


def test_plan_cli_json(capsys):
    assert main(["plan", "tst_qwen3_10b_a1b", "--gpus", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpus"] == 64 and report["nodes"] == 8
    assert [p["iterations"] for p in report["phases"]] == [12483, 49983 - 12483]
    assert report["text_ratio"] == pytest.approx(1 + 15 * 12483 / 49983)
    assert "--expert-model-parallel-size" in report["megatron_args"]
    assert main(["plan", "tst_tiny", "tst.bag_size=2", "training.train_iters=100"]) == 0
    out = capsys.readouterr().out
    assert "phase 1 (superposition)" in out and "TST reads 1.30x" in out


def test_overrides_are_typed_and_checked():
    recipe = load_recipe("tst_tiny", overrides=[
        "tst.bag_size=8", "training.lr=1e-4", "parallel.sequence_parallel=true",
        "recipe.run_dir=/tmp/x", "extra_args=--foo 1", "precision=fp8_current", "model.kv_channels=null",
    ])
    assert recipe.tst.bag_size == 8 and recipe.training.lr == 1e-4
    assert recipe.parallel.sequence_parallel is True and recipe.run_dir == "/tmp/x"
    assert recipe.extra_args == ["--foo", "1"] and recipe.precision.name == "fp8_current"
    for bad, words in [
        ("model.num_layerz=3", "unknown override key 'model.num_layerz'; model has:"),
        ("optimizer.lr=1", "sections are"),
        ("tst.bag_size=two", "expected int"),
        ("model=3", "names a section"),
        ("tst.bag_size", "is not key=value"),
        ("precision=fp4", "unknown precision 'fp4'"),
    ]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_recipe("tst_tiny", overrides=[bad])


@pytest.mark.parametrize("overrides, gpus, words", [
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
      "model.seq_length=63"], 2, "divisible by --tensor-model-parallel-size=2"),
    (["parallel.context_parallel_size=2", "model.seq_length=66"], 2,
     "divisible by 2 x --context-parallel-size = 4"),
    (["training.global_batch_size=6"], 2, "must be a multiple of --micro-batch-size x data-parallel"),
    (["parallel.tensor_model_parallel_size=2"], 1, "not a multiple of tp x pp x cp"),
    (["precision=fp8_delayed", "parallel.micro_batch_size=1", "model.seq_length=40"], 1,
     "to be a multiple of 16"),
    (["precision=mxfp8", "parallel.micro_batch_size=1", "model.seq_length=48"], 1,
     "to be a multiple of 32"),
    (["model.num_experts=3", "parallel.expert_model_parallel_size=2"], 2,
     "divisible by --expert-model-parallel-size 2"),
    (["parallel.virtual_pipeline_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
      "model.num_layers=6"], 2, "chunks must divide model.num_layers=6"),
    (["tst.bag_size=0"], 1, "bag_size (s) must be >= 1"),
    (["tst.phase1_fraction=1.0"], 1, "strictly between 0 and 1"),
])
def test_recipe_validation_names_the_fix(overrides, gpus, words):
    with pytest.raises(ValueError) as err:  # TST settings are refused as the override applies
        check_recipe(load_recipe("tst_tiny", gpus=gpus, overrides=overrides), local=False)
    assert words in str(err.value)


def test_presets_that_do_not_exist_are_refused():
    with pytest.raises(ValueError, match="has parallel presets for"):
        load_recipe("tst_llama3_270m", gpus=4)
    with pytest.raises(ValueError, match="One GPU cannot hold 10B parameters"):
        load_recipe("tst_qwen3_10b_a1b", gpus=1)
    with pytest.raises(ValueError, match="unknown recipe 'tst_llama4'"):
        load_recipe("tst_llama4")


def test_where_the_job_runs_checks(tmp_path):
    """local=True adds what only the job's machine can check: data, TE for FP8, MXFP8 arch."""
    import importlib.util

    recipe = load_recipe("tst_tiny", overrides=[f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="data.prefix is not set"):
        check_recipe(recipe, local=True)
    recipe = load_recipe("tst_tiny", overrides=[f"run_dir={tmp_path / 'run'}",
                                                f"data.prefix={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="does not exist"):
        check_recipe(recipe, local=True)
    if importlib.util.find_spec("transformer_engine") is None:
        from nemo_tst.training.arguments import check_runtime
        from nemo_tst.training.arguments import parse_megatron_args

        fp8 = load_recipe("tst_tiny", overrides=["precision=fp8_delayed", "model.seq_length=64"])
        with pytest.raises(ValueError, match="needs Transformer Engine"):
            check_runtime(parse_megatron_args(fp8.megatron_args()))
        mx = load_recipe("tst_tiny", overrides=["precision=mxfp8", "model.seq_length=64"])
        with pytest.raises(ValueError, match="mxfp8 needs a Blackwell GPU"):
            check_runtime(parse_megatron_args(mx.megatron_args()))


def test_conf_is_yaml_with_citations():
    for name, path in recipe_files().items():
        if name.startswith("tst_") and name != "tst_tiny":
            text = path.read_text()
            assert "config.json" in text or "paper" in text.lower(), f"{path} cites no source"


# A user's recipe in the built-ins' schema (self-contained: no built-in file is copied).
USER_RECIPE = """\
model: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 172, num_attention_heads: 4,
        num_query_groups: 2, vocab_size: 1024, seq_length: 64}
training: {train_iters: 40, global_batch_size: 8, lr: 3.0e-3, min_lr: 3.0e-4, warmup_iters: 3}
tst: {bag_size: 3, phase1_fraction: 0.25}
parallel:
  1: {micro_batch_size: 4}
"""


def test_a_recipe_dir_adds_recipes_to_recipes_and_plan(tmp_path, capsys):
    (tmp_path / "my_tiny.yaml").write_text(USER_RECIPE)
    (tmp_path / "tst_tiny.yaml").write_text(USER_RECIPE.replace("bag_size: 3", "bag_size: 5"))
    (tmp_path / "notes.txt").write_text("not a recipe")
    names = recipe_names(tmp_path)
    assert "my_tiny" in names and set(recipe_names()) <= set(names) and "notes" not in names
    assert "my_tiny" not in recipe_names()  # only when the directory is given

    assert main(["recipes", "--recipe-dir", str(tmp_path)]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"my_tiny", *recipe_names()} <= listed

    assert main(["plan", "my_tiny", "--recipe-dir", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["iterations"] for p in report["phases"]] == [10, 30]  # 0.25 of 40 steps, s=3
    assert main(["plan", "my_tiny", "--recipe-dir", str(tmp_path), "tst.bag_size=2"]) == 0
    assert "phase 1 (superposition)" in capsys.readouterr().out

    # The user's file named like a built-in recipe wins; without the directory the built-in.
    assert load_recipe("tst_tiny", recipe_dir=tmp_path).tst.bag_size == 5
    assert load_recipe("tst_tiny").tst.bag_size != 5


def test_a_missing_or_wrong_recipe_dir_is_refused(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"recipe directory {missing} does not exist"):
        recipe_names(missing)
    assert main(["plan", "tst_tiny", "--recipe-dir", str(missing)]) == 1
    assert f"recipe directory {missing} does not exist" in capsys.readouterr().err
    assert main(["recipes", "--recipe-dir", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no <name>.yaml recipe files"):
        load_recipe("tst_tiny", recipe_dir=empty)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_tiny.yaml").write_text(USER_RECIPE)
    with pytest.raises(ValueError, match=r"unknown recipe 'other'; choose one of \[.*'my_tiny'"):
        load_recipe("other", recipe_dir=tmp_path / "mine")
    (tmp_path / "mine" / "no_tst.yaml").write_text(USER_RECIPE.replace("tst:", "tsst:"))
    with pytest.raises(ValueError, match=r"no_tst.yaml needs the sections .*missing .*\['tst'\]"):
        load_recipe("no_tst", recipe_dir=tmp_path / "mine")
    (tmp_path / "mine" / "typo.yaml").write_text(USER_RECIPE.replace("num_layers", "num_layerz"))
    with pytest.raises(ValueError, match="typo.yaml, section model: .*num_layerz.*its fields are"):
        load_recipe("typo", recipe_dir=tmp_path / "mine")


def test_missing_package_conf_is_a_broken_install_not_an_empty_catalog(tmp_path, monkeypatch):
    import nemo_tst.conf as conf

    assert conf.conf_file("recipes/tst_tiny.yaml").is_file()
    assert read_conf(conf.CONF_DIR / "demo.yaml")  # the path nemo_tst.demo reads
    monkeypatch.setattr(conf, "CONF_FILES", tmp_path / "no-conf")
    with pytest.raises(FileNotFoundError, match="no recipes in .*no-conf.*install is broken"):
        recipe_names()
    with pytest.raises(FileNotFoundError, match="precision.yaml is missing: the nemo-tst install is broken"):
        precision_names()
    with pytest.raises(FileNotFoundError, match=r"^\S*elsewhere.yaml is missing$"):
        read_conf(tmp_path / "elsewhere.yaml")  # a user's file: no reinstall advice


def test_moe_recipes_group_their_experts_gemms_with_transformer_engine():
    """With TE layers, a rank's experts run as one grouped GEMM with fused token permutation,
    not a Python loop over the experts; without TE (local layers, CPU) neither kernel exists."""
    te = load_recipe("tst_qwen3_10b_a1b", gpus=8).megatron_args()
    assert "--moe-grouped-gemm" in te and "--moe-permute-fusion" in te
    for overrides in (["transformer_impl=local"], ["cpu=true", "transformer_impl=local"]):
        args = load_recipe("tst_qwen3_10b_a1b", gpus=8, overrides=overrides).megatron_args()
        assert "--moe-grouped-gemm" not in args and "--moe-permute-fusion" not in args
    dense = load_recipe("tst_llama3_270m", gpus=8).megatron_args()
    assert "--moe-grouped-gemm" not in dense


def test_local_layers_need_no_te_or_apex_kernel_on_a_gpu_either():
    """transformer_impl=local turns off every fusion Megatron's defaults ask of TE or Apex, on
    a GPU as on a CPU; the CPU adds only its device arguments."""
    from nemo_tst.recipes.config import LOCAL_LAYERS_ARGS

    gpu = load_recipe("tst_demo_gpu", overrides=["transformer_impl=local"]).megatron_args()
    cpu = load_recipe("tst_demo_gpu", overrides=["transformer_impl=local", "cpu=true"]).megatron_args()
    for flag in ("--no-rope-fusion", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
                 "--no-persist-layer-norm"):
        assert flag in LOCAL_LAYERS_ARGS and flag in gpu and flag in cpu
    assert "--tst-cpu" not in gpu and "--bf16" in gpu
    assert {"--tst-cpu", "--use-cpu-initialization"} <= set(cpu)
