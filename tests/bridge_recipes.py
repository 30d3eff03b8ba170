"""A tiny Megatron-Bridge pretraining recipe: the model, data, schedule and seed of
tests/test_training_e2e.py's `tiny_args` (Megatron-LM's trainer), as a Bridge ConfigContainer.

`tiny_pretrain_config(...)` is a recipe function in Bridge's idiom; `write_recipe_module` writes
a module whose zero-argument `recipe()` returns it for one data set, for
`python -m nemo_tst.bridge.cli --recipe MODULE:recipe`.
"""

from pathlib import Path

import torch.nn.functional as F

from nemo_tst.recipes.catalog import load_recipe
from tests.test_training_e2e import DECAY, LR, MIN_LR, N, SAVE_INTERVAL, WARMUP


def tiny_pretrain_config(*, train_prefix: str, valid_prefix: str, vocab_size: int, save: str,
                         train_iters: int = N):
    from megatron.bridge.models import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        GPTDatasetConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TokenizerConfig,
        TrainingConfig,
        ValidationConfig,
    )

    model = GPTModelProvider(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        seq_length=32, position_embedding_type="rope", normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0,
        vocab_size=None, make_vocab_size_divisible_by=128, layernorm_epsilon=1e-5,
        init_method_std=0.02, bf16=False, fp16=False,
    )
    tiny = load_recipe("tst_tiny").training  # the optimizer of test_training_e2e's runs
    optimizer = OptimizerConfig(
        optimizer="adam", lr=LR, min_lr=MIN_LR, weight_decay=0.0, adam_beta1=tiny.adam_beta1,
        adam_beta2=tiny.adam_beta2, adam_eps=1e-8, clip_grad=tiny.clip_grad, use_distributed_optimizer=False,
        bf16=False, fp16=False,
    )
    scheduler = SchedulerConfig(
        lr_decay_style="WSD", lr_wsd_decay_style="linear", lr_wsd_decay_iters=DECAY,
        lr_warmup_iters=WARMUP, lr_warmup_init=0.0, start_weight_decay=0.0, end_weight_decay=0.0,
        weight_decay_incr_style="constant",
    )
    return ConfigContainer(
        train=TrainingConfig(train_iters=train_iters, global_batch_size=4, micro_batch_size=2),
        validation=ValidationConfig(eval_interval=5, eval_iters=1),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        dataset=GPTDatasetConfig(
            random_seed=1234, seq_length=32, blend=None,
            blend_per_split=[([train_prefix], None), ([valid_prefix], None), ([valid_prefix], None)],
            split=None, reset_attention_mask=False, reset_position_ids=False,
            eod_mask_loss=False, dataloader_type="single", num_workers=0,
        ),
        logger=LoggerConfig(log_interval=1),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=vocab_size),
        checkpoint=CheckpointConfig(save=save, save_interval=SAVE_INTERVAL, ckpt_format="torch_dist"),
        rng=RNGConfig(seed=1234),
        mixed_precision=None,
    )


def write_recipe_module(directory: Path, name: str, data: dict, save: Path, **kw) -> str:
    """Write DIRECTORY/NAME.py with `recipe()` = tiny_pretrain_config for `data` (the
    prepare_stdlib_data dict); returns "NAME:recipe"."""
    directory.mkdir(parents=True, exist_ok=True)
    args = dict(train_prefix=data["train_prefix"], valid_prefix=data["valid_prefix"],
                vocab_size=data["vocab_size"], save=str(save), **kw)
    (directory / f"{name}.py").write_text(
        "from tests.bridge_recipes import tiny_pretrain_config\n\n\n"
        f"def recipe():\n    return tiny_pretrain_config(**{args!r})\n"
    )
    return f"{name}:recipe"


def tiny_mock_pretrain_config():
    """The same tiny model on Megatron's mock data (no files needed): docs/bridge.md's CPU
    command. Set checkpoint.save with an override."""
    cfg = tiny_pretrain_config(train_prefix="", valid_prefix="", vocab_size=256, save="")
    cfg.dataset.blend_per_split = None
    cfg.dataset.split = "9999,8,2"
    cfg.checkpoint.save = None
    return cfg
