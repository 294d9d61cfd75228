"""The memory plan of a training run: bytes per GPU for weights, gradients, optimizer states and
activations, the parallelism that fits, and whether it fits at all (no torch: the operator tool
prints it before a job is applied).

The figures follow the trainer (`training/`): float32 master weights, AdamW (two float32
moments), bf16 compute; DDP keeps a replica of all of it per GPU, FSDP2 (`fully_shard` per block)
keeps 1/N of it plus the gathered bf16 weights (and float32 gradients) of the blocks in flight.
Activations are what autograd keeps for backward, in bf16, per token and layer (attention
through a fused SDPA kernel, so no [T, T] score matrix), plus the logits in bf16 and float32 and
their gradient; with activation checkpointing a block keeps only its inputs, and one block's
activations are rebuilt at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.gpu_instances import GpuInstance

GIB = 1 << 30
# What a job can use of a GPU's memory: the CUDA context, NCCL's buffers and the allocator's
# fragmentation take the rest.
USABLE = 0.90
WEIGHT_BYTES = 4  # float32 master weights
GRAD_BYTES = 4
ADAM_BYTES = 8  # exp_avg and exp_avg_sq in float32
ACT_BYTES = 2  # bf16 activations
# FSDP2 gathers the next block while one computes (prefetch): two blocks' weights in flight.
BLOCKS_IN_FLIGHT = 2


class PlanError(ValueError):
    """A model the plan cannot read; the message names the file or the preset."""


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family model (the fields of Hugging Face's LlamaConfig)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def block_parameters(self) -> int:
        h, d = self.hidden_size, self.head_dim
        qkv = h * (self.num_heads + 2 * self.num_kv_heads) * d
        qkv += (self.num_heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0
        return qkv + self.num_heads * d * h + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    @property
    def parameters(self) -> int:
        return (
            self.num_layers * self.block_parameters + self.embedding_parameters + self.hidden_size
        )

    def lora_parameters(self, rank: int, targets: tuple[str, ...]) -> int:
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        dims = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return self.num_layers * sum(rank * (a + b) for a, b in (dims[t] for t in targets))

    def activation_elements_per_token_layer(self) -> int:
        """What backward needs of one layer, per token: the norms' inputs and outputs, q, k
        (rotated) and v, the attention output, the MLP's gate/up output and its SwiGLU."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        return 4 * h + (q + 2 * kv) + (q + kv) + q + 3 * i


# Shapes of released models and of kiln's presets (`modeling.config.PRESETS`; a test keeps the
# two in step).
SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("tiny", 320, 64, 192, 2, 4, 2, 16, tie_embeddings=True),
        ModelShape("small", 320, 256, 704, 4, 8, 4, 32, tie_embeddings=True),
        ModelShape("base", 320, 768, 2048, 12, 12, 4, 64),
        ModelShape("1b", 320, 2048, 5632, 22, 32, 4, 64),
        ModelShape("smollm2-360m", 49152, 960, 2560, 32, 15, 5, 64, tie_embeddings=True),
        ModelShape("llama-3.2-1b", 128256, 2048, 8192, 16, 32, 8, 64, tie_embeddings=True),
        ModelShape("llama-3-8b", 128256, 4096, 14336, 32, 32, 8, 128),
        ModelShape("llama-3-70b", 128256, 8192, 28672, 80, 64, 8, 128),
    )
}


def shape_from_hf_config(config: dict[str, Any], name: str) -> ModelShape:
    """The shape of a Hugging Face `config.json` (Llama, Mistral, Qwen2)."""
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelShape(
            name=name,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise PlanError(f"{name}: config.json lacks a Llama-family field ({err})") from None


# Reads an object's bytes by its s3:// URI; raises PlanError saying what went wrong.
ReadS3 = Callable[[str], bytes]


def _config(text: bytes | str, where: str, name: str) -> ModelShape:
    try:
        config = json.loads(text)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise PlanError(f"{where} is not JSON ({err})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{where} holds {type(config).__name__}, not a JSON object")
    return shape_from_hf_config(config, name)


def resolve_shape(model: str, *, read_s3: ReadS3 | None = None) -> ModelShape:
    """A preset's or released model's name (`SHAPES`), a local model directory, or an s3://
    model directory (its config.json read with `read_s3`)."""
    if model in SHAPES:
        return SHAPES[model]
    if model.startswith("s3://"):
        if read_s3 is None:
            raise PlanError(f"--model {model}: reading a model from S3 needs AWS access here")
        uri = model.rstrip("/") + "/config.json"
        return _config(read_s3(uri), uri, model)
    path = Path(model) / "config.json"
    if not path.is_file():
        raise PlanError(
            f"--model {model!r} is neither a known shape ({', '.join(SHAPES)}), nor a directory "
            "with a config.json, nor an s3:// model directory"
        )
    return _config(path.read_bytes(), str(path), model)


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    instance: GpuInstance
    world: int  # GPUs in the job
    strategy: str  # ddp or fsdp
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    trainable: int
    weights: int  # bytes per GPU
    gradients: int
    optimizer: int
    activations: int
    gathered: int  # FSDP: the unsharded blocks in flight

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.gathered

    @property
    def capacity(self) -> int:
        return int(self.instance.gpu_memory_gib * GIB * USABLE)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def render(self) -> str:
        s = self.shape

        def gib(n: int) -> str:
            return f"{n / GIB:8.2f} GiB"

        lines = [
            f"memory plan: {s.name} on {self.world} x {self.instance.gpu_model} "
            f"{self.instance.gpu_memory_gib} GiB ({self.instance.name})",
            f"  parameters      {s.parameters / 1e9:8.2f} B ({self.trainable / 1e9:.3f} B trained)",
            f"  strategy        {self.strategy}"
            + (" + activation checkpointing" if self.activation_checkpointing else ""),
            f"  micro-batch     {self.micro_batch} x {self.seq_len} tokens",
            "  per GPU:",
            f"    weights       {gib(self.weights)}",
            f"    gradients     {gib(self.gradients)}",
            f"    optimizer     {gib(self.optimizer)}",
            f"    activations   {gib(self.activations)}",
        ]
        if self.strategy == "fsdp":
            lines.append(f"    gathered      {gib(self.gathered)}  (blocks in flight)")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"    total         {gib(self.total)} of {gib(self.capacity)}: {verdict}")
        return "\n".join(lines) + "\n"


def plan(
    shape: ModelShape,
    instance: GpuInstance,
    *,
    world: int,
    micro_batch: int,
    seq_len: int,
    strategy: str = "auto",
    activation_checkpointing: bool = False,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> Plan:
    """The plan of one configuration; `strategy` auto picks DDP when a replica fits, else FSDP
    (as the trainer's `--strategy auto` does)."""
    if strategy == "auto":
        ddp = plan(
            shape,
            instance,
            world=world,
            micro_batch=micro_batch,
            seq_len=seq_len,
            strategy="ddp",
            activation_checkpointing=activation_checkpointing,
            lora_rank=lora_rank,
            lora_targets=lora_targets,
        )
        if ddp.fits or world == 1:
            return ddp
        strategy = "fsdp"
    if strategy == "fsdp" and world == 1:
        strategy = "ddp"  # one GPU: nothing to shard over (the trainer does the same)
    trainable = shape.lora_parameters(lora_rank, lora_targets) if lora_rank else shape.parameters
    fields = _bytes(
        shape, world, strategy, micro_batch, seq_len, activation_checkpointing, trainable
    )
    return Plan(
        shape=shape,
        instance=instance,
        world=world,
        strategy=strategy,
        micro_batch=micro_batch,
        seq_len=seq_len,
        activation_checkpointing=activation_checkpointing,
        trainable=trainable,
        **fields,
    )


def _bytes(
    shape: ModelShape,
    world: int,
    strategy: str,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    trainable: int,
) -> dict[str, int]:
    total = shape.parameters + (trainable if trainable != shape.parameters else 0)
    shards = world if strategy == "fsdp" else 1
    tokens = micro_batch * seq_len
    per_layer = shape.activation_elements_per_token_layer() * ACT_BYTES
    if checkpointing:  # each block keeps its inputs (the stream and the block's output)
        layers = shape.num_layers * 2 * shape.hidden_size * ACT_BYTES + per_layer
    else:
        layers = shape.num_layers * per_layer
    # Logits in bf16, in float32 for the loss, and the float32 gradient of the loss's input.
    logits = shape.vocab_size * (ACT_BYTES + 4 + 4)
    gathered = 0
    if strategy == "fsdp":
        block = shape.block_parameters
        # bf16 weights of the blocks in flight, the float32 gradient of one before its
        # reduce-scatter, and the root's (embedding, head) gathered weights.
        gathered = BLOCKS_IN_FLIGHT * block * ACT_BYTES + block * GRAD_BYTES
        gathered += shape.embedding_parameters * ACT_BYTES
    return {
        "weights": -(-total * WEIGHT_BYTES // shards),
        "gradients": -(-trainable * GRAD_BYTES // shards),
        "optimizer": -(-trainable * ADAM_BYTES // shards),
        "activations": tokens * (layers + logits),
        "gathered": gathered,
    }


def trainer_settings(trainer_args: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """What the plan needs of the trainer's flags (`--micro-batch-size` ...), with the
    trainer's defaults."""
    found: dict[str, str] = {}
    args = list(trainer_args)
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if eq:
                found[key] = value
            elif i + 1 < len(args):
                found[key] = args[i + 1]
    targets = found.get("lora-targets", "q_proj,k_proj,v_proj,o_proj")
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {
        "micro_batch": int(found.get("micro-batch-size", 16)),
        "seq_len": int(found.get("seq-len", 256)),
        "strategy": found.get("strategy", "auto"),
        "activation_checkpointing": found.get("activation-checkpointing", "false").lower()
        in ("1", "true", "yes", "on"),
        "lora_rank": int(found.get("lora-rank", 0)),
        "lora_targets": all_linear
        if targets == "all-linear"
        else tuple(t.strip() for t in targets.split(",") if t.strip()),
        "model": found.get("init-from") or found.get("model"),
    }


def advice(p: Plan, *, gpus_per_node: int) -> str:
    """What would make a plan that does not fit fit: checkpointing, more nodes, adapters."""
    if p.fits:
        return ""
    tips = []
    kwargs: dict[str, Any] = {
        "micro_batch": p.micro_batch,
        "seq_len": p.seq_len,
        "strategy": "fsdp",
    }
    if not p.activation_checkpointing:
        ac = plan(p.shape, p.instance, world=p.world, activation_checkpointing=True, **kwargs)
        if ac.fits:
            return "pass --activation-checkpointing true to the trainer"
        tips.append("--activation-checkpointing true")
    for nodes in range(max(1, p.world // gpus_per_node) + 1, 65):
        more = plan(
            p.shape,
            p.instance,
            world=nodes * gpus_per_node,
            activation_checkpointing=True,
            **kwargs,
        )
        if more.fits:
            tips.append(f"{nodes} nodes with activation checkpointing")
            break
    if p.trainable == p.shape.parameters:
        tips.append("LoRA adapters (--lora-rank 16) instead of full fine-tuning")
    if p.micro_batch > 1:
        tips.append("a smaller --micro-batch-size with --grad-accum")
    return "try " + ", or ".join(tips) if tips else "no configuration of this instance type fits"
