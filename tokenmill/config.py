"""Engine configuration: frozen dataclasses validated on construction, composed into EngineConfig.

Each field carries its help string in `metadata["help"]`; the CLI builds its flags from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tokenmill.spec.config import SpeculativeConfig, parse_speculative_config

GiB = 1 << 30
# The CPU's weight quantizations (quant/int8_cpu.py, quant/int4_cpu.py): float32 activations into C kernels, an int8
# K/V cache by default, and bf16 prompt attention allowed.
CPU_QUANTIZATIONS = ("int8", "int4")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = field(
        default=None, metadata=_help("HF model directory or .gguf file; default: embedded SmolLM2-135M-Instruct")
    )
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer directory (default: the model's)"))
    device: str = field(default="auto", metadata=_help("auto, cpu or cuda (auto: cuda when a GPU is present)"))
    dtype: str = field(
        default="auto", metadata=_help("compute dtype: auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16")
    )
    quantization: str = field(
        default="none",
        metadata=_help("none, int8 (CPU: int8 weights per channel + dynamic int8 activations), int4 (CPU: 4-bit "
                       "weights in groups of 32 with fp16 scale and minimum, GGUF's Q4_1 rule, + 16-bit activations "
                       "per group at decode) or fp8 (FP8 weights with per-channel scales; Hopper GPUs)"),
    )
    quantize_lm_head: bool = field(
        default=True,
        metadata=_help("with quantization=int8 or int4, also quantize the vocabulary projection (lm_head) to int8, "
                       "the largest weight every decode step reads (false: keep it float32); ignored otherwise"),
    )
    int8_activation_bits: int = field(
        default=8,
        metadata=_help("with quantization=int8, bits of the per-token activations of the decoder's projections: 8, "
                       "or 7 (~1.15x faster int8 products on AVX2 CPUs without VNNI, for twice the activation rounding "
                       "error; benchmarks/quant_quality.py measures the cost)"),
    )
    fused_decode: bool = field(
        default=True,
        metadata=_help("on the CPU in float32, run decode steps of up to 64 requests, and steps with prompt rows of up "
                       "to 4096 tokens (not with int4 weights), through the one-call C forward (every layer in one "
                       "kernel call); false: layer by layer, as every other step runs"),
    )
    panel_gemm: bool = field(
        default=True,
        metadata=_help("on the CPU, keep float32 projections and the vocabulary projection packed in 16-channel "
                       "panels for the C GEMM (faster than torch's at every batch size; the C forward needs it "
                       "for float32); false: torch's GEMM on the plain weights"),
    )
    kernels: str = field(
        default="auto",
        metadata=_help("CPU kernel family: auto (the execution plan times the correct candidates on this machine and "
                       "model and runs the fastest; cached), c (our C kernels wherever one exists) or torch "
                       "(torch/oneDNN ops only: no C kernel, no C forward); for tests and A/B runs"),
    )
    batch_invariant: bool = field(
        default=False,
        metadata=_help("deterministic mode (CPU; float32, int8 or int4 weights): a request's tokens and logprobs are "
                       "bit-identical whatever else is in the batch, with prefix hits, chunked prefill and preemption: "
                       "every operation runs one kernel whose reductions do not depend on the rows beside it (no C "
                       "forward, per-row attention); costs throughput (README)"),
    )
    huge_pages: bool = field(
        default=True,
        metadata=_help("on the CPU, keep the weights and the KV cache in 2 MiB transparent huge pages "
                       "(madvise; fewer TLB misses when decode streams them); false: the allocator's 4 KiB pages"),
    )
    enforce_eager: bool = field(
        default=False, metadata=_help("never capture CUDA graphs for decode steps (cuda with the triton backend)")
    )
    max_model_len: int | None = field(
        default=None, metadata=_help("context length (default: the model's max_position_embeddings)")
    )
    seed: int = field(default=0, metadata=_help("global seed for unseeded sampling"))

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization not in ("none", *CPU_QUANTIZATIONS, "fp8"):
            raise ValueError(f"quantization must be none, int8, int4 or fp8, got {self.quantization!r}")
        if self.kernels not in ("auto", "c", "torch"):
            raise ValueError(f"kernels must be auto, c or torch, got {self.kernels!r}")
        if self.int8_activation_bits not in (8, 7):
            raise ValueError(f"int8_activation_bits must be 8 or 7, got {self.int8_activation_bits}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    kv_cache_memory: int | None = field(
        default=None, metadata=_help("bytes for the KV cache (default: kv_cache_memory_fraction of free memory)")
    )
    kv_cache_memory_fraction: float = field(
        default=0.1, metadata=_help("fraction of free memory for the KV cache when kv_cache_memory is unset")
    )
    num_blocks: int | None = field(
        default=None, metadata=_help("exact number of KV blocks (overrides memory; default: from the memory budget)")
    )
    enable_prefix_caching: bool = field(default=True, metadata=_help("reuse KV blocks of shared prompt prefixes"))
    attention_backend: str = field(
        default="auto", metadata=_help("auto, torch or triton (auto: triton on cuda, torch on cpu)")
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata=_help("auto (the compute dtype; int8 with CPU int8/int4 quantization; a bfloat16 model on the "
                       "CPU: bfloat16 where it has AVX512-BF16, else float16), float32, float16 (halves the memory "
                       "decode attention streams; torch backend), bfloat16 (tiles the bf16 dot products read as "
                       "they lie; torch backend: even block_size), int8 (a quarter of float32, per-position "
                       "scales; torch backend) or fp8 (e4m3; triton backend on a GPU)"),
    )

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "float16", "bfloat16", "int8", "fp8"):
            raise ValueError(f"kv_cache_dtype must be auto, float32, float16, bfloat16, int8 or fp8, got "
                             f"{self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = field(default=2048, metadata=_help("most tokens computed in one step"))
    max_num_seqs: int = field(default=256, metadata=_help("most requests running at once"))
    policy: str = field(default="fcfs", metadata=_help("fcfs or priority (lower priority value runs first)"))
    enable_chunked_prefill: bool = field(
        default=True, metadata=_help("split long prompts over steps (else a prompt must fit one step)")
    )

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = field(default=1, metadata=_help("number of tensor-parallel ranks"))
    data_parallel_size: int = field(
        default=1, metadata=_help("engine replicas behind one server (`tokenmill serve`), each in its own process "
                                  "with its share of the cores; requests routed by --data-parallel-routing"))
    data_parallel_routing: str = field(
        default="prefix", metadata=_help("prefix: to the replica holding the longest cached prefix of the prompt unless "
                                         "it is much busier, else the least busy; load: always the least busy"))
    nnodes: int = field(default=1, metadata=_help("machines the tensor-parallel ranks span (torchrun's meaning)"))
    node_rank: int = field(
        default=0, metadata=_help("this machine's index among --nnodes: 0 runs the engine (and serves), the others "
                                  "run their share of the ranks only"))
    master_addr: str = field(default="127.0.0.1", metadata=_help("address node 0 listens on for the ranks"))
    master_port: int | None = field(
        default=None, metadata=_help("port node 0 listens on for the ranks (needed with --nnodes > 1; default: a "
                                     "free one)"))
    num_threads: int | None = field(default=None, metadata=_help("CPU intra-op threads (default: all cores)"))
    compile: bool = field(
        default=False,
        metadata=_help("torch.compile (inductor) the dense parts of each decoder layer around the eager paged "
                       "attention, compiled and warmed up at start-up (torch attention backend)"),
    )

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_routing not in ("prefix", "load"):
            raise ValueError(f"data_parallel_routing must be prefix or load, got {self.data_parallel_routing!r}")
        if self.data_parallel_size > 1 and self.nnodes > 1:
            raise ValueError("data_parallel_size > 1 runs on one machine; it does not combine with nnodes > 1 yet")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got node_rank={self.node_rank}, nnodes={self.nnodes}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be a multiple of "
                             f"nnodes={self.nnodes} (the same number of ranks on every node)")
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("nnodes > 1 needs master_port (and master_addr: node 0's address)")
        if self.tensor_parallel_size > 1 and self.compile:
            raise ValueError("compile does not work with tensor_parallel_size > 1 yet (the layers' all-reduces)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")


@dataclass(frozen=True)
class SpeculativeOptions:
    speculative_config: str | dict | None = field(
        default=None,
        metadata=_help('speculative decoding, as JSON (vLLM\'s): {"method": "ngram", "num_speculative_tokens": 4, '
                       '"prompt_lookup_max": 4, "prompt_lookup_min": 1} or {"method": "draft_model", "model": PATH, '
                       '"num_speculative_tokens": 4, "quantization": "int4"} ("model": "default" is the embedded '
                       'model); optional "disable_by_batch_size", "min_acceptance_rate" (the governor) '
                       '(default: none, no speculative decoding)'))

    def __post_init__(self) -> None:
        self.spec  # noqa: B018 -- validates the JSON now, with a ValueError that says what is wrong

    @property
    def spec(self) -> SpeculativeConfig | None:
        return parse_speculative_config(self.speculative_config)


def _check_batch_invariant(config: EngineConfig) -> None:
    """What deterministic mode (ModelConfig.batch_invariant) runs on: the CPU's float32 C kernels, alone."""
    m = config.model
    if m.device == "cuda":
        raise ValueError("batch_invariant is a CPU mode (its kernels are the C ones); on a GPU leave it off")
    if m.dtype not in ("auto", "float32") or m.quantization == "fp8":
        raise ValueError("batch_invariant runs float32 models, and int8 or int4 weights with float32 activations; "
                         f"got dtype={m.dtype!r}, quantization={m.quantization!r}")
    if m.kernels == "torch" or not m.panel_gemm:
        raise ValueError("batch_invariant needs the C kernels (kernels=auto or c, panel_gemm=true): torch's GEMM "
                         "is not batch-invariant")
    if config.parallel.tensor_parallel_size > 1 or config.parallel.compile:
        raise ValueError("batch_invariant does not work with tensor_parallel_size > 1 or compile yet")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)

    def __post_init__(self) -> None:
        spec = self.speculative.spec
        if spec is not None and spec.method == "draft_model" and self.parallel.tensor_parallel_size > 1:
            raise ValueError("a draft model does not work with tensor_parallel_size > 1 yet (the draft would need "
                             "its own shards); use the ngram method or one rank")
        if self.model.batch_invariant:
            _check_batch_invariant(self)
        if self.parallel.compile and self.model.quantization != "none":
            # Panel-packed int8 weights (a ctypes kernel) and fp8 weights are opaque to dynamo.
            raise ValueError(
                f"compile does not work with quantization={self.model.quantization!r} yet; drop one of the two"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> EngineConfig:
        """Build from flat keyword arguments (as the CLI and LLM() take them); unknown names are an error."""
        parts: dict[str, dict[str, object]] = {}
        remaining = dict(kwargs)
        for part_name, part_cls in _PARTS.items():
            names = {f.name for f in fields(part_cls)}
            parts[part_name] = {k: remaining.pop(k) for k in list(remaining) if k in names}
        if remaining:
            raise ValueError(f"unknown engine arguments: {sorted(remaining)}")
        return cls(**{name: _PARTS[name](**values) for name, values in parts.items()})


_PARTS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig,
          "speculative": SpeculativeOptions}
ENGINE_CONFIG_PARTS = _PARTS
