"""`nemo-tst export-hf`: a TST run's checkpoint as a Hugging Face checkpoint, equal in
`transformers` to the model in Megatron.

Tiny models are trained through `nemo-tst pretrain` (Megatron-LM's trainer, CPU, gloo) as in
tests/test_training_e2e.py; each export is loaded with `AutoModelForCausalLM` and compared
with a vanilla megatron-core `GPTModel` built from the checkpoint's own arguments and loaded
from the same checkpoint: logits on the same ids (fp32, at most 1e-4 apart) and 20 greedily
generated tokens (equal). Runs:

    main   GQA (4 heads, 2 query groups), untied, vocabulary 500 padded to 512, both phases
    tp2    the same at TP=2, from the same initial weights (--pretrained-checkpoint)
    pp2    the same at PP=2, likewise
    tied   tied embeddings, head dim 32 != hidden/heads, rope base 5e5 with Llama-3 scaling,
           eps 1e-6, vocabulary padded to 576 (phase 1 only: the mapping does not see phases)
    moe    Qwen3-MoE shape: 4 experts top-2, QK-norm, GQA (phase 1 only)

Every run saves every iteration; the first update runs at the warm-up's LR of 0, so iteration
1 of main, tp2 and pp2 holds the same initial weights saved in three layouts: their exports
must be identical tensor for tensor.
"""

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch  # noqa: E402

from tests.test_training_e2e import run_pretrain, tiny_args  # noqa: E402

N, N1 = 6, 2  # iterations of the two-phase runs, of which phase 1 (r = 0.3)
VOCAB = 500  # the tokenizer's size; Megatron pads it to 512 (or 576 with divisor 96)
NEW_TOKENS = 20
TOLERANCE = 1e-4


def with_values(argv: list[str], **values) -> list[str]:
    """argv with the given options' values replaced (--lr-warmup-iters as lr_warmup_iters)."""
    argv = list(argv)
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        argv[argv.index(flag) + 1] = str(value)
    return argv


GQA = ["--group-query-attention", "--num-query-groups", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nemo_tst.demo import prepare_stdlib_data

    return prepare_stdlib_data(tmp_path_factory.mktemp("data"), max_bytes=300_000, vocab_size=VOCAB)


def one_update_args(data, *extra) -> list[str]:
    """Phase 1 only, one iteration with a real update (no warm-up), saved."""
    argv = with_values(tiny_args(data), train_iters=2, lr_warmup_iters=0, lr_wsd_decay_iters=1,
                       lr=3e-2, save_interval=1)
    return argv + ["--tst-phase", "1", *extra]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The run directories, trained once for the module."""
    root = tmp_path_factory.mktemp("runs")
    seed = root / "seed"
    run_pretrain(seed, with_values(tiny_args(data), train_iters=2, lr_warmup_iters=1,
                                   lr_wsd_decay_iters=1) + GQA + ["--tst-phase", "1"])
    main_argv = with_values(tiny_args(data), train_iters=N, lr_warmup_iters=1, lr_wsd_decay_iters=2,
                            save_interval=1) + GQA + ["--pretrained-checkpoint", str(seed / "phase1")]
    out = {"main": root / "main", "tp2": root / "tp2", "pp2": root / "pp2", "tied": root / "tied",
           "moe": root / "moe"}
    run_pretrain(out["main"], main_argv)
    run_pretrain(out["tp2"], main_argv + ["--tensor-model-parallel-size", "2"], nproc=2)
    run_pretrain(out["pp2"], main_argv + ["--pipeline-model-parallel-size", "2"], nproc=2)
    tied = [a for a in one_update_args(data) if a != "--untie-embeddings-and-output-weights"]
    run_pretrain(out["tied"], tied + ["--kv-channels", "32", "--rotary-base", "500000",
                                      "--use-rope-scaling", "--norm-epsilon", "1e-6",
                                      "--make-vocab-size-divisible-by", "96"])
    run_pretrain(out["moe"], one_update_args(data) + GQA + [
        "--kv-channels", "32", "--qk-layernorm", "--num-experts", "4", "--moe-router-topk", "2",
        "--moe-ffn-hidden-size", "32", "--moe-token-dispatcher-type", "allgather",
        "--moe-aux-loss-coeff", "1e-3"])
    return out


def checkpoint(run: Path, phase: int, iteration: int) -> Path:
    return run / f"phase{phase}" / f"iter_{iteration:07d}"


# ----- Megatron's side: a vanilla GPTModel from the checkpoint's own arguments ------------------

def megatron_model(ckpt: Path):
    """megatron-core's GPTModel (local spec, no nemo_tst model code) built from the arguments
    saved in `ckpt` and loaded from it, resharded into one process."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.argument_utils import core_transformer_config_from_args

    args = copy.deepcopy(dist_checkpointing.load_common_state_dict(str(ckpt))["args"])
    for size in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "expert_model_parallel_size", "context_parallel_size"):
        setattr(args, size, 1)
    config = core_transformer_config_from_args(args)
    spec = get_gpt_layer_local_spec(num_experts=args.num_experts, qk_layernorm=args.qk_layernorm,
                                    normalization=args.normalization)
    model = GPTModel(
        config, spec, args.padded_vocab_size, args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
    )
    sharded = model.sharded_state_dict(
        metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})
    loaded = dist_checkpointing.load({"model": sharded}, str(ckpt))
    model.load_state_dict(loaded["model"], strict=True)
    return model.eval()


def megatron_logits(model, ids):
    """[b, s, padded vocab] logits, fp32."""
    from nemo_tst.cpu import causal_attention_mask

    s = ids.shape[1]
    with torch.no_grad():
        return model(ids, torch.arange(s).expand_as(ids), causal_attention_mask(s))


def megatron_greedy(model, prompt, new_tokens: int, vocab: int):
    """Greedy decoding by full recomputation, over the tokenizer's ids only (the padded rows
    are no tokens)."""
    ids = prompt
    for _ in range(new_tokens):
        next_id = megatron_logits(model, ids)[:, -1, :vocab].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[:, prompt.shape[1]:]


# ----- HF's side --------------------------------------------------------------------------------

def hf_model(out: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()


def hf_greedy(model, prompt, new_tokens: int):
    """transformers' own generate (KV cache), greedy, not stopping at the EOD token."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0,
                              eos_token_id=None, pad_token_id=model.config.pad_token_id)
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                              generation_config=config)[:, prompt.shape[1]:]


def sample_ids(vocab: int):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(vocab, (2, 32), generator=generator)


PROMPT_TEXT = "def main(argv):\n    "


def compare(case: str, ckpt: Path, out: Path) -> dict:
    """Logits within TOLERANCE and equal greedy generations, HF export vs Megatron."""
    from transformers import AutoTokenizer

    megatron = megatron_model(ckpt)
    hf = hf_model(out)
    vocab = hf.config.vocab_size
    ids = sample_ids(vocab)
    reference = megatron_logits(megatron, ids)
    with torch.no_grad():
        exported = hf(ids).logits
    assert exported.shape == (2, 32, vocab) and reference.shape[-1] >= vocab
    diff = (exported - reference[..., :vocab]).abs().max().item()
    print(f"\n[{case}] max |HF - Megatron| logit difference: {diff:.3g}")
    assert diff <= TOLERANCE

    prompt = AutoTokenizer.from_pretrained(out)(PROMPT_TEXT, return_tensors="pt")["input_ids"]
    expected = megatron_greedy(megatron, prompt, NEW_TOKENS, vocab)
    generated = hf_greedy(hf, prompt, NEW_TOKENS)
    assert generated.shape == (1, NEW_TOKENS)
    assert generated.tolist() == expected.tolist()
    return {"hf": hf, "megatron": megatron, "logits": exported}


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory, single_rank):
    from nemo_tst.export import export_hf

    root = tmp_path_factory.mktemp("exports")
    out = {name: export_hf(runs[name], root / name) for name in ("main", "tp2", "pp2")}
    out["tied"] = export_hf(runs["tied"], root / "tied", iteration=1, allow_phase1=True)
    out["moe"] = export_hf(runs["moe"], root / "moe", iteration=1, allow_phase1=True)
    for name in ("main", "tp2", "pp2"):  # the initial weights, saved in each layout
        out[f"{name}@1"] = export_hf(runs[name], root / f"{name}@1", iteration=1, allow_phase1=True)
    return out


def safetensors_of(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# ----- the exported model equals Megatron's ----------------------------------------------------

def test_final_checkpoint_exports_as_llama_equal_to_megatron(runs, exports):
    out = exports["main"]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (VOCAB, 4, 2)
    assert config["tie_word_embeddings"] is False
    tensors = safetensors_of(out)
    # Megatron's padded rows (500 -> 512) are gone; every weight is there, nothing else.
    assert tensors["model.embed_tokens.weight"].shape == (VOCAB, 64)
    assert tensors["lm_head.weight"].shape == (VOCAB, 64)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    assert len(tensors) == 3 + 2 * 9
    compare("ws1 final (GQA, untied, padded vocab)", checkpoint(runs["main"], 2, N), out)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_tp2_and_pp2_checkpoints_export_the_same_model(runs, exports, layout):
    # The same weights saved at TP=2 / PP=2 and at world size 1 export identically.
    same_init, reference_init = safetensors_of(exports[f"{layout}@1"]), safetensors_of(exports["main@1"])
    assert same_init.keys() == reference_init.keys()
    for name, tensor in reference_init.items():
        assert torch.equal(same_init[name], tensor), name
    # The trained model: equal to Megatron's, and to the world-size-1 run's up to the float
    # noise in which TP/PP training differs.
    result = compare(f"{layout} final", checkpoint(runs[layout], 2, N), exports[layout])
    ws1 = hf_model(exports["main"])
    with torch.no_grad():
        ws1_logits = ws1(sample_ids(VOCAB)).logits
    apart = (result["logits"] - ws1_logits).abs().max().item()
    print(f"[{layout} final] max |{layout} export - ws1 export| logit difference: {apart:.3g}")
    assert apart < 1e-3


def test_tied_embeddings_head_dim_rope_scaling_and_padding(runs, exports):
    out = exports["tied"]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["head_dim"] == 32
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    assert config["rope_theta"] == 500000.0 and config["rms_norm_eps"] == 1e-6
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 8.0
    tensors = safetensors_of(out)
    assert "lm_head.weight" not in tensors  # tied: HF's head is the embedding
    assert tensors["model.embed_tokens.weight"].shape == (VOCAB, 64)  # 576 rows in Megatron
    result = compare("tied, head dim 32, llama3 rope, vocab 576->500", checkpoint(runs["tied"], 1, 1), out)
    # RoPE: HF's frequencies are Megatron's Llama-3-scaled ones (and scaling changed them).
    megatron_freq = result["megatron"].rotary_pos_emb.inv_freq
    hf_freq = result["hf"].model.rotary_emb.inv_freq
    torch.testing.assert_close(hf_freq, megatron_freq, rtol=1e-6, atol=0)
    unscaled = 1.0 / 500000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)
    assert not torch.allclose(hf_freq, unscaled)


def test_moe_checkpoint_exports_as_qwen3_moe_equal_to_megatron(runs, exports):
    out = exports["moe"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 2, 32)
    assert config["norm_topk_prob"] is True
    tensors = safetensors_of(out)
    assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, 32)
    assert tensors["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    compare("MoE (Qwen3-MoE, 4 experts top-2, QK-norm)", checkpoint(runs["moe"], 1, 1), out)


def test_tokenizer_loads_with_autotokenizer_and_encodes_like_ours(data, exports):
    from transformers import AutoTokenizer

    from nemo_tst.data import HFTokenizer

    ours = HFTokenizer.from_file(data["tokenizer"])
    theirs = AutoTokenizer.from_pretrained(exports["main"])
    text = "def f(x):\n    return x ** 2  # squared\r\n"
    assert theirs(text)["input_ids"] == ours.tokenize(text)
    assert theirs.decode(ours.tokenize(text)) == text
    assert (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id) == (ours.eod, ours.eod, ours.pad)
    for file in ("config.json", "generation_config.json"):
        config = json.loads((exports["main"] / file).read_text())
        assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (0, 0, 1)
    # The README's generate line.
    encoded = theirs("def main(", return_tensors="pt")
    assert set(encoded) == {"input_ids", "attention_mask"}
    generated = hf_model(exports["main"]).generate(**encoded, max_new_tokens=5, do_sample=False)
    assert generated[0, :encoded["input_ids"].shape[1]].tolist() == encoded["input_ids"][0].tolist()
    assert theirs.decode(generated[0]).startswith("def main(")


def test_bf16_through_the_cli_and_sharded_safetensors(runs, exports, tmp_path, single_rank):
    from nemo_tst.cli import main
    from nemo_tst.export import export_hf

    out = tmp_path / "bf16"
    assert main(["export-hf", str(runs["main"]), str(out), "--dtype", "bf16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    bf16 = safetensors_of(out)
    fp32 = safetensors_of(exports["main"])
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)

    sharded = export_hf(runs["main"], tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (sharded / "model.safetensors").exists()
    ids = sample_ids(VOCAB)
    with torch.no_grad():
        assert torch.equal(hf_model(sharded)(ids).logits, hf_model(exports["main"])(ids).logits)


# ----- refusals ---------------------------------------------------------------------------------

def test_phase1_checkpoint_is_refused_unless_allowed(runs, tmp_path, capsys, single_rank):
    from nemo_tst.cli import main
    from nemo_tst.export import export_hf

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--iteration 2 is a phase-1 checkpoint .*--allow-phase1"):
        export_hf(runs["main"], out, iteration=N1)
    assert main(["export-hf", str(runs["main"]), str(out), "--iteration", str(N1)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nemo-tst export-hf: error: ") and "--allow-phase1" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["export-hf", str(runs["main"]), str(out), "--iteration", str(N1),
                 "--allow-phase1"]) == 0
    assert (out / "model.safetensors").is_file()


def test_phase1_of_an_s1_run_is_ordinary_training_and_exports(runs, tmp_path, single_rank):
    """A baseline (s = 1) from the two-launch layout: its phase 1 is next-token training."""
    from nemo_tst.export import export_hf

    src = checkpoint(runs["main"], 1, N1)
    superposed = resave(src, tmp_path / "s4", N1, phase=1, bag_size=4)
    with pytest.raises(ValueError, match="--allow-phase1"):
        export_hf(superposed, tmp_path / "out", iteration=N1)
    baseline = resave(src, tmp_path / "s1", N1, phase=1, bag_size=1)
    assert (export_hf(baseline, tmp_path / "out", iteration=N1) / "model.safetensors").is_file()


def test_out_below_a_regular_file_names_out(runs, tmp_path, capsys, monkeypatch, single_rank):
    """An OS error on the export's directory names OUT, not a bare "[Errno 17] File exists"."""
    from nemo_tst.cli import main

    monkeypatch.delenv("NEMO_TST_DEBUG", raising=False)
    (tmp_path / "a_file").write_text("not a directory")
    out = tmp_path / "a_file" / "export"
    assert main(["export-hf", str(runs["main"]), str(out)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"OUT {out}: {tmp_path / 'a_file'} is a file, not a directory" in err, err


def test_existing_out_is_not_overwritten_without_overwrite(runs, tmp_path, single_rank):
    from nemo_tst.export import export_hf

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model-00001-of-00009.safetensors").write_text("stale shard")
    with pytest.raises(ValueError, match=r"OUT .*out is not empty.*--overwrite"):
        export_hf(runs["main"], out)
    assert (out / "config.json").read_text() == "{}"
    export_hf(runs["main"], out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not (out / "model-00001-of-00009.safetensors").exists()
    assert not list(tmp_path.glob(".out.export-*"))  # no staging directory left behind


def resave(src: Path, run: Path, iteration: int, *, phase: int = 2, args_changes=None,
           add=None, drop=(), plan_iters: int = N, bag_size: int = 4) -> Path:
    """A run directory holding one torch_dist checkpoint written by megatron-core's
    dist_checkpointing: `src`'s weights and saved arguments, edited."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from nemo_tst.export.checkpoint import read_checkpoint

    args, tensors = read_checkpoint(src)
    for name, value in (args_changes or {}).items():
        setattr(args, name, value)
    tensors.update(add or {})
    for name in drop:
        del tensors[name]
    state = {key: ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
             for key, tensor in tensors.items()}
    state.update(args=args, iteration=iteration, checkpoint_version=3.0)
    ckpt = checkpoint(run, phase, iteration)
    ckpt.mkdir(parents=True)
    dist_checkpointing.save(state, str(ckpt))
    (ckpt.parent / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    (run / "tst_run.json").write_text(json.dumps(
        {"plan": {"train_iters": plan_iters, "superposition": {"bag_size": bag_size}}}))
    return run


# (name, saved-argument changes, extra tensors, the flag the message must name)
UNSUPPORTED = {
    "learned absolute positions": (
        {"position_embedding_type": "learned_absolute"},
        {"embedding.position_embeddings.weight": torch.zeros(32, 64)}, "--position-embedding-type"),
    "QK-norm on a Llama target": ({"qk_layernorm": True}, {}, "--qk-layernorm"),
    "QKV bias": ({"add_qkv_bias": True}, {}, "--add-qkv-bias"),
    "linear biases": ({"add_bias_linear": True}, {}, "--add-bias-linear"),
    "partial rotary": ({"rotary_percent": 0.5}, {}, "--rotary-percent"),
    "LayerNorm": ({"normalization": "LayerNorm"}, {}, "--normalization"),
    "GELU MLP": ({"swiglu": False}, {}, "--swiglu"),
    "MoE without QK-norm": ({"num_experts": 4}, {}, "--qk-layernorm"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_settings_are_refused_before_writing(runs, tmp_path, single_rank, case):
    from nemo_tst.export import export_hf

    changes, extra, flag = UNSUPPORTED[case]
    run = resave(checkpoint(runs["main"], 2, N), tmp_path / "run", N, args_changes=changes, add=extra)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="cannot be exported as") as error:
        export_hf(run, out)
    assert flag in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()


def test_refusal_table_names_every_setting():
    """Each refused setting, alone on an otherwise supported Llama namespace, is named."""
    import argparse

    from nemo_tst.export.hf import LLAMA_REFUSALS, QWEN3_MOE_REFUSALS, unsupported_settings

    base = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                rotary_percent=1.0, softmax_type="vanilla", num_experts=None)
    assert unsupported_settings(argparse.Namespace(**base)) == []
    bad_values = {"position_embedding_type": "none", "rotary_percent": 0.5, "rope_type": "yarn",
                  "normalization": "LayerNorm", "softmax_type": "learnable", "moe_layer_freq": 2,
                  "moe_router_score_function": "sigmoid", "moe_router_topk_scaling_factor": 2.5}
    for rules, extra in ((LLAMA_REFUSALS, {}), (QWEN3_MOE_REFUSALS, {"num_experts": 4, "qk_layernorm": True})):
        for rule in rules:
            value = next(v for v in (bad_values.get(rule.attr), True, 7, False) if v is not None
                         and not rule.supported(v))
            problems = unsupported_settings(argparse.Namespace(**{**base, **extra, rule.attr: value}))
            assert len(problems) == 1 and problems[0].startswith(rule.flag), (rule.attr, problems)


def test_leftover_and_missing_weights_are_named(runs, tmp_path, single_rank):
    from nemo_tst.export import export_hf

    src = checkpoint(runs["main"], 2, N)
    extra = {"decoder.layers.mlp.linear_fc1.bias": torch.zeros(2, 256)}
    run = resave(src, tmp_path / "extra", N, add=extra)
    with pytest.raises(ValueError, match=r"no place in the HF model: decoder\.layers\.0\.mlp\.linear_fc1\.bias"):
        export_hf(run, tmp_path / "out")
    run = resave(src, tmp_path / "missing", N, drop=["decoder.final_layernorm.weight"])
    with pytest.raises(ValueError, match=r"lacks 1 weight\(s\) the model needs: decoder\.final_layernorm\.weight"):
        export_hf(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unfinished_run_unknown_iteration_and_bad_dtype_are_refused(runs, tmp_path, single_rank):
    from nemo_tst.export import export_hf

    run = resave(checkpoint(runs["main"], 2, 4), tmp_path / "run", 4)  # plan: N = 6
    with pytest.raises(ValueError, match=r"at iteration 4 of the plan's 6: .*--iteration 4"):
        export_hf(run, tmp_path / "out")
    assert export_hf(run, tmp_path / "out", iteration=4).is_dir()
    with pytest.raises(ValueError, match=r"--iteration 5: no complete checkpoint .*phase 2 has \[4\]"):
        export_hf(run, tmp_path / "other", iteration=5)
    with pytest.raises(ValueError, match=r"--dtype 'fp16': choose one of fp32, bf16"):
        export_hf(run, tmp_path / "other", dtype="fp16")
    with pytest.raises(ValueError, match=r"RUN_DIR .* is not a TST run directory"):
        export_hf(tmp_path, tmp_path / "other")


def complete_checkpoint(directory: Path, iteration: int) -> Path:
    """A torch_dist checkpoint of `iteration` as megatron-core saves one (one small tensor, no
    training), recorded as the latest by the tracker, as Megatron's trainer does after a save."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from nemo_tst.core.run_dir import ITERATION_DIR, MEGATRON_TRACKER

    ckpt = directory / ITERATION_DIR.format(iteration)
    ckpt.mkdir(parents=True)
    weight = torch.arange(4096, dtype=torch.float32)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}, str(ckpt))
    (directory / MEGATRON_TRACKER).write_text(str(iteration))
    return ckpt


def test_export_and_a_resume_agree_on_a_damaged_latest_checkpoint(tmp_path, single_rank):
    """The tracker of phase 2 names iteration N, whose weights file is cut short (a full disk,
    a copy interrupted): the driver falls back to iteration 4, so the run is not finished, and
    the export says so instead of reading the damaged checkpoint."""
    from nemo_tst.core.plan import check_plan
    from nemo_tst.core.run_dir import RunDirectory
    from nemo_tst.core.settings import TSTSettings
    from nemo_tst.export.checkpoint import choose_checkpoint
    from nemo_tst.training.arguments import MEGATRON_NAMES

    plan = check_plan(MEGATRON_NAMES, TSTSettings(bag_size=4, phase1_iters=N1), train_iters=N,
                      seq_length=32, global_batch_size=4)
    run = RunDirectory(tmp_path / "run")
    run.claim({}, plan, MEGATRON_NAMES)
    complete_checkpoint(run.phase_dir(1), N1)
    complete_checkpoint(run.phase_dir(2), 4)
    damaged = complete_checkpoint(run.phase_dir(2), N)
    [weights] = [p for p in damaged.iterdir() if p.suffix == ".distcp"]
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    [(directory, resume_at, problems)] = run.damaged_fallbacks(plan, MEGATRON_NAMES)
    assert (directory, resume_at) == (run.phase_dir(2), 4) and "truncated" in problems[0]
    with pytest.raises(ValueError, match=r"at iteration 4 of the plan's 6 \(damaged: .*truncated"):
        choose_checkpoint(run.root, None, allow_phase1=False)
    with pytest.raises(ValueError, match=r"--iteration 6: no complete checkpoint .*phase 2 has \[4\]"):
        choose_checkpoint(run.root, N, allow_phase1=False)
    choice = choose_checkpoint(run.root, resume_at, allow_phase1=False)
    assert (choice.path, choice.phase, choice.final_iteration) == (run.iteration_dir(2, 4), 2, N)
