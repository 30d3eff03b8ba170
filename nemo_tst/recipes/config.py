"""A TST pretraining recipe as data: model shape, schedule, TST settings, parallel layout,
precision, data and where to save. `TSTRecipe.megatron_args()` turns it into the arguments of
`nemo-tst pretrain` (Megatron-LM GPT arguments plus `--tst-*`), the one place a recipe meets
Megatron; everything downstream (validation, the plan, launching) reads those arguments.

The recipes of the paper's scales are YAML files in `conf/recipes/` (loaded by
`nemo_tst.recipes.catalog`); every field below can be overridden as `section.field=value`.
"""

from dataclasses import dataclass, field
from typing import Optional

from nemo_tst.core.settings import TSTSettings, settings_argv

__all__ = [
    "LOCAL_LAYERS_ARGS", "DataPaths", "ModelShape", "ParallelLayout", "Precision", "TSTRecipe", "TSTSettings",
    "TrainingSchedule",
]


@dataclass(kw_only=True)
class ModelShape:
    """A Llama-style GPT (RMSNorm, SwiGLU, RoPE, no biases), dense or MoE."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    """SwiGLU hidden size of dense layers."""
    num_attention_heads: int
    num_query_groups: Optional[int] = None
    """Key/value heads (grouped-query attention); None: as many as attention heads."""
    kv_channels: Optional[int] = None
    """Head dimension; None: hidden_size / num_attention_heads."""
    vocab_size: int
    """Model vocabulary; must cover the tokenizer the data was preprocessed with."""
    seq_length: int
    """L: latent positions in phase 1, tokens in phase 2 (and the baseline's sequence length)."""
    rotary_base: int = 10000
    untie_embeddings: bool = True
    qk_layernorm: bool = False
    norm_epsilon: float = 1e-5
    num_experts: Optional[int] = None
    """Routed experts per MoE layer; None: dense. Every layer is MoE when set (Qwen3-MoE)."""
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_aux_loss_coeff: float = 1e-3

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def parameters(self) -> tuple[int, int]:
        """(total, active per token) parameter counts, embeddings and head included."""
        h, d = self.hidden_size, self.head_dim
        kv = self.num_query_groups or self.num_attention_heads
        attention = h * self.num_attention_heads * d * 2 + h * kv * d * 2  # q, o; k, v
        norms = 2 * h + (2 * d if self.qk_layernorm else 0)
        if self.num_experts:
            expert = 3 * h * (self.moe_ffn_hidden_size or self.ffn_hidden_size)  # SwiGLU
            router = h * self.num_experts
            total_mlp = self.num_experts * expert + router
            active_mlp = self.moe_router_topk * expert + router
        else:
            total_mlp = active_mlp = 3 * h * self.ffn_hidden_size
        embeddings = self.vocab_size * h * (2 if self.untie_embeddings else 1) + h  # + final norm
        total = self.num_layers * (attention + norms + total_mlp) + embeddings
        active = self.num_layers * (attention + norms + active_mlp) + embeddings
        return total, active

    def training_flops_per_position(self) -> int:
        """Forward + backward FLOPs per sequence position: 6 x (active matmul parameters,
        the output layer included) + causal attention 6 x layers x L x (heads x head_dim).

        The same in both phases: phase 1 runs the transformer on L latent positions, and
        averaging s embeddings and gathering s target logits add O(s x hidden) per position."""
        _, active = self.parameters()
        h = self.hidden_size
        input_embedding = self.vocab_size * h if self.untie_embeddings else 0  # a lookup, no FLOPs
        matmul = active - input_embedding
        attention = 6 * self.num_layers * self.seq_length * self.num_attention_heads * self.head_dim
        return 6 * matmul + attention

    def megatron_args(self) -> list:
        args = [
            "--num-layers", self.num_layers, "--hidden-size", self.hidden_size,
            "--ffn-hidden-size", self.ffn_hidden_size,
            "--num-attention-heads", self.num_attention_heads,
            "--seq-length", self.seq_length, "--max-position-embeddings", self.seq_length,
            "--vocab-size", self.vocab_size,
            "--position-embedding-type", "rope", "--rotary-base", self.rotary_base,
            "--normalization", "RMSNorm", "--norm-epsilon", self.norm_epsilon, "--swiglu",
            "--disable-bias-linear",
        ]
        if self.num_query_groups and self.num_query_groups != self.num_attention_heads:
            args += ["--group-query-attention", "--num-query-groups", self.num_query_groups]
        if self.kv_channels:
            args += ["--kv-channels", self.kv_channels]
        if self.untie_embeddings:
            args += ["--untie-embeddings-and-output-weights"]
        if self.qk_layernorm:
            args += ["--qk-layernorm"]
        if self.num_experts:
            args += [
                "--num-experts", self.num_experts, "--moe-router-topk", self.moe_router_topk,
                "--moe-ffn-hidden-size", self.moe_ffn_hidden_size or self.ffn_hidden_size,
                "--moe-aux-loss-coeff", self.moe_aux_loss_coeff,
                "--moe-router-load-balancing-type", "aux_loss",
            ]
        return args


@dataclass(kw_only=True)
class TrainingSchedule:
    """Steps, batch and one WSD learning-rate schedule spanning both phases."""

    train_iters: int
    """N: iterations of both phases together."""
    global_batch_size: int
    lr: float
    min_lr: float = 0.0
    warmup_iters: int = 2000
    decay_fraction: float = 0.1
    """WSD: the LR decays linearly over the last `decay_fraction` of all N steps (paper: 10%)."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    eval_interval: int = 1000
    eval_iters: int = 20
    save_interval: int = 1000
    log_interval: int = 10

    def megatron_args(self) -> list:
        return [
            "--train-iters", self.train_iters, "--global-batch-size", self.global_batch_size,
            "--lr", self.lr, "--min-lr", self.min_lr, "--lr-decay-style", "WSD",
            "--lr-wsd-decay-style", "linear",
            "--lr-wsd-decay-iters", max(int(round(self.decay_fraction * self.train_iters)), 1),
            "--lr-warmup-iters", self.warmup_iters,
            "--weight-decay", self.weight_decay, "--adam-beta1", self.adam_beta1,
            "--adam-beta2", self.adam_beta2, "--clip-grad", self.clip_grad, "--seed", self.seed,
            "--eval-interval", self.eval_interval, "--eval-iters", self.eval_iters,
            "--save-interval", self.save_interval, "--log-interval", self.log_interval,
        ]


@dataclass(kw_only=True)
class ParallelLayout:
    """How the model and batch are split over `num_gpus` processes (one per GPU)."""

    num_gpus: int = 1
    """Processes in all (GPUs, or CPU ranks when `cpu`)."""
    gpus_per_node: int = 8
    micro_batch_size: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved pipeline: model chunks per pipeline rank."""
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    distributed_optimizer: bool = False
    recompute_activations: bool = False
    """Full activation recomputation (uniform, every layer)."""

    @property
    def nodes(self) -> int:
        return max(1, -(-self.num_gpus // self.gpus_per_node))

    @property
    def procs_per_node(self) -> int:
        return min(self.num_gpus, self.gpus_per_node)

    def megatron_args(self, num_layers: int) -> list:
        args = [
            "--micro-batch-size", self.micro_batch_size,
            "--tensor-model-parallel-size", self.tensor_model_parallel_size,
            "--pipeline-model-parallel-size", self.pipeline_model_parallel_size,
            "--context-parallel-size", self.context_parallel_size,
            "--expert-model-parallel-size", self.expert_model_parallel_size,
        ]
        if self.virtual_pipeline_model_parallel_size:
            chunks = self.pipeline_model_parallel_size * self.virtual_pipeline_model_parallel_size
            if num_layers % chunks:
                raise ValueError(
                    f"parallel.virtual_pipeline_model_parallel_size="
                    f"{self.virtual_pipeline_model_parallel_size} x pipeline size "
                    f"{self.pipeline_model_parallel_size} = {chunks} chunks must divide "
                    f"model.num_layers={num_layers}"
                )
            args += ["--num-layers-per-virtual-pipeline-stage", num_layers // chunks]
        if self.expert_tensor_parallel_size:
            args += ["--expert-tensor-parallel-size", self.expert_tensor_parallel_size]
        if self.sequence_parallel:
            args += ["--sequence-parallel"]
        if self.distributed_optimizer:
            args += ["--use-distributed-optimizer"]
        if self.recompute_activations:
            args += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                     "--recompute-num-layers", "1"]
        return args


@dataclass(kw_only=True)
class Precision:
    """A named precision preset (conf/precision.yaml) and the Megatron arguments it maps to."""

    name: str = "bf16"
    args: list = field(default_factory=lambda: ["--bf16"])
    """Megatron-LM arguments; what they need of the machine (Transformer Engine for FP8, a
    Blackwell GPU for MXFP8) is checked from them (`training.arguments.check_runtime`)."""


@dataclass(kw_only=True)
class DataPaths:
    """The output of `nemo-tst preprocess --output-prefix PREFIX`."""

    prefix: Optional[str] = None
    """PREFIX: training data PREFIX_train, held-out PREFIX_valid, tokenizer PREFIX_tokenizer.json."""
    tokenizer: Optional[str] = None
    """tokenizer.json, when not PREFIX_tokenizer.json."""
    num_workers: int = 2
    """Data-loader worker processes per rank (0 on CPU)."""

    @property
    def tokenizer_path(self) -> Optional[str]:
        return self.tokenizer or (f"{self.prefix}_tokenizer.json" if self.prefix else None)

    def megatron_args(self) -> list:
        if not self.prefix:
            return []
        return [
            "--train-data-path", f"{self.prefix}_train", "--valid-data-path", f"{self.prefix}_valid",
            "--tst-tokenizer", self.tokenizer_path, "--tokenizer-type", "NullTokenizer",
        ]


@dataclass(kw_only=True)
class TSTRecipe:
    """Everything one two-phase TST run needs; `megatron_args()` is what both phases get."""

    name: str
    model: ModelShape
    training: TrainingSchedule
    tst: TSTSettings
    """The TST settings (`nemo_tst.core.settings`), every one of them settable as tst.FIELD."""
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    precision: Precision = field(default_factory=Precision)
    data: DataPaths = field(default_factory=DataPaths)
    run_dir: Optional[str] = None
    """`--save`: the run directory, which holds both phases' checkpoints (`RunDirectory`)."""
    cpu: bool = False
    """Run Megatron on CPU with gloo (nemo_tst/cpu.py): tests and machines without a GPU."""
    transformer_impl: str = "transformer_engine"
    """transformer_engine (NVIDIA containers) or local (plain PyTorch layers, with the
    `LOCAL_LAYERS_ARGS` that need no TE or Apex kernel: what a pip install runs)."""
    extra_args: list = field(default_factory=list)
    """More Megatron-LM arguments, appended last."""

    def megatron_args(self) -> list[str]:
        args = [
            *self.model.megatron_args(), *self.training.megatron_args(),
            *self.parallel.megatron_args(self.model.num_layers), *settings_argv(self.tst),
            "--ckpt-format", "torch_dist",
            "--attention-dropout", 0.0, "--hidden-dropout", 0.0,
            "--num-workers", 0 if self.cpu else self.data.num_workers,  # no workers on CPU
            *self.data.megatron_args(),
        ]
        if self.run_dir:
            args += ["--save", self.run_dir]
        if self.cpu:
            from nemo_tst.cpu import TRAINER_CPU_ARGS

            args += [*TRAINER_CPU_ARGS, *LOCAL_LAYERS_ARGS]
        elif self.transformer_impl == "local":
            args += [*LOCAL_LAYERS_ARGS, *self.precision.args]
        else:
            args += ["--transformer-impl", self.transformer_impl, *self.precision.args]
        if self.model.num_experts:
            # all-to-all needs CUDA streams; allgather also works over gloo.
            args += ["--moe-token-dispatcher-type", "allgather" if self.cpu else "alltoall"]
            if self.transformer_impl == "transformer_engine" and not self.cpu:
                # One grouped GEMM for a rank's experts and fused token permutation (both TE
                # kernels), instead of a Python loop over the local experts.
                args += ["--moe-grouped-gemm", "--moe-permute-fusion"]
        return [str(a) for a in args + list(self.extra_args)]


LOCAL_LAYERS_ARGS = (
    "--transformer-impl", "local", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion", "--no-persist-layer-norm",
)
"""Megatron's plain-PyTorch layers with the kernels its defaults ask of Transformer Engine or
Apex turned off: fused RoPE (TE), gradient-accumulation fusion (Apex's
fused_weight_gradient_mlp_cuda, used by the output layer), the fused masked softmax (Apex
kernels) and the persistent layer norm (Apex; torch's norm asserts it is off). On GPU and CPU
alike (`training.arguments.check_runtime` names any of them left on where its kernel is
missing)."""

