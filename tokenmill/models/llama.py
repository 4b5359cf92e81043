"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over one flat batch of tokens.

Weights use HF names; q/k/v and gate/up are merged into one GEMM each at load time.

Tensor parallelism (`tp`, distributed/communicator.py): a rank holds its share of every weight (distributed/
sharding.py): query/KV heads and the MLP's intermediate channels column-parallel in qkv_proj and gate_up_proj, the
same row-parallel in o_proj and down_proj, whose partial outputs are summed over the ranks (one all-reduce each), and
a share of the vocabulary in the embedding (looked up where held, then summed) and lm_head (logits gathered). Norms,
residual stream and rotary tables are whole on every rank. A row-parallel bias is added by rank 0 only.

Code outside models/ sees LlamaForCausalLM through the causal-LM interface (models/interface.py) only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata
from tokenmill.attention.layer import Attention
from tokenmill.distributed.communicator import SINGLE, Communicator
from tokenmill.distributed.sharding import even_share, shard_heads
from tokenmill.kernels.cpu.layer_ops import layer_ops_available as c_layer_ops_available
from tokenmill.kernels.cpu.layer_ops import rows_max
from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.kernel_choice import LayerKernel, layer_kernel_for
from tokenmill.layers.linear import Embedding, Linear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.panel_linear import Bf16PanelLinear
from tokenmill.layers.planned_linear import PlannedLinear
from tokenmill.layers.rotary import RotaryEmbedding, rope_parameters
from tokenmill.models.interface import DecoderLayerParts, Projection

CosSin = tuple[torch.Tensor, torch.Tensor]


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, backend: AttentionBackend, tp: Communicator = SINGLE) -> None:
        super().__init__()
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.shard = shard_heads(cfg.num_attention_heads, num_kv_heads, tp.rank, tp.world_size)
        self.num_heads = len(self.shard.q_slots)  # this rank's: whole groups of its KV heads
        self.num_kv_heads = len(self.shard.kv_heads)
        self.head_dim = _head_dim(cfg)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Qwen2 has q/k/v bias; Llama exposes it as attention_bias.
        bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=bool(getattr(cfg, "attention_bias", False)))
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, backend)

    def keep_own_rows(self, attn_out: torch.Tensor) -> torch.Tensor:
        """attn_out [T, q_size] with, in each KV head group this rank shares with others, the rows another rank
        attends set to zero (distributed/sharding.py): o_proj's all-reduce then adds each row's group once."""
        if not self.shard.splits_rows:
            return attn_out
        rows = attn_out.shape[0]
        groups = attn_out.view(rows, self.num_kv_heads, -1)
        for i, (index, parts) in enumerate(self.shard.row_shares):
            if parts > 1:
                start, end = even_share(rows, parts, index)
                groups[:start, i] = 0
                groups[end:, i] = 0
        return attn_out

    def project_qkv(
        self, cos_sin: CosSin, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, hidden_size] -> q [T, H, D], k/v [T, Hkv, D], rotated as self.attn.attend expects."""
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.attn.rotate(q, k, v, cos_sin)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, kernel: LayerKernel = "torch", tp: Communicator = SINGLE) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.tp = tp
        self.channels = even_share(cfg.intermediate_size, tp.world_size, tp.rank)  # [start, end) of this rank's
        width = self.channels[1] - self.channels[0]
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * width, bias=bias)
        self.down_proj = Linear(width, cfg.hidden_size, bias=bias)
        self.act = SiluAndMul(kernel)
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; Llama-family models use silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.act(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    """Takes and returns (sublayer output, residual stream): each norm first adds the previous
    sublayer's output to the residual (one fused kernel on the triton path). The residual stream
    after layer i is exactly HF's hidden state there.

    The layer is three calls: pre_attention and post_attention (dense, per-token, tensors in and out,
    no metadata) around the paged attention (eager, driven by `meta`). worker/compile.py swaps in
    compiled versions of the two dense parts, which is why they touch nothing but tensors and
    parameters.
    """

    def __init__(self, cfg: Any, backend: AttentionBackend, tp: Communicator = SINGLE) -> None:
        super().__init__()
        kernel = layer_kernel_for(backend)
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernel)
        self.self_attn = LlamaAttention(cfg, backend, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernel)
        self.mlp = LlamaMLP(cfg, kernel, tp)

    def forward(
        self, cos_sin: CosSin, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, residual = self.pre_attention(cos_sin, hidden, residual)
        attn_out = self.self_attn.keep_own_rows(self.self_attn.attn.attend(q, k, v, meta, cos_sin))
        return self.post_attention(attn_out, residual)

    def pre_attention(
        self, cos_sin: CosSin, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[residual add +] RMSNorm -> qkv GEMM -> rotary: (q, k, v, residual stream)."""
        if residual is None:  # the first layer: the embeddings are the residual stream
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        q, k, v = self.self_attn.project_qkv(cos_sin, hidden)
        return q, k, v, residual

    def post_attention(self, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o_proj GEMM -> residual add + RMSNorm -> MLP: (MLP output, residual stream)."""
        hidden = self.tp.all_reduce(self.self_attn.o_proj(attn_out))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: Any, backend: AttentionBackend, max_positions: int, dtype: torch.dtype, device: torch.device,
        tp: Communicator = SINGLE,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.vocab = even_share(cfg.vocab_size, tp.world_size, tp.rank)  # [start, end) of the rows held here
        self.vocab_sizes = [b - a for a, b in (even_share(cfg.vocab_size, tp.world_size, r)
                                               for r in range(tp.world_size))]
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        # On the CPU the tables stay float32 whatever the model's dtype: the C kernels rotate in float32.
        rotary_dtype = torch.float32 if torch.device(device).type == "cpu" else dtype
        self.rotary = RotaryEmbedding(_head_dim(cfg), max_positions, rope_parameters(cfg), rotary_dtype, device)
        self.embed_tokens = Embedding(self.vocab[1] - self.vocab[0], cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, backend, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, layer_kernel_for(backend))
        # A bfloat16 model on the CPU's C kernels keeps the residual stream in float32: the norms' C kernel adds
        # each sublayer's bf16 output into it and returns bf16 for the next product (no torch conversions).
        self.float32_residual = (dtype == torch.bfloat16 and layer_kernel_for(backend) == "cpu"
                                 and c_layer_ops_available())
        self.lm_head = Linear(cfg.hidden_size, self.vocab[1] - self.vocab[0], bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A replacement of lm_head for compute_logits: quantized (quant/int8_cpu.py; lm_head itself stays,
        # as it may be the embedding table) or the float32 panel product (layers/panel_linear.py, which
        # also becomes lm_head, and the embedding's source when tied).
        self.logits_head: nn.Module | None = None
        self.greedy_screen: tuple[int, nn.Module] | None = None  # set by the execution plan (worker/planner.py)

    # -- the causal-LM interface (models/interface.py) ---------------------------------------------
    def decoder_layers(self) -> list[DecoderLayerParts]:
        return [DecoderLayerParts(
            layer, layer.self_attn.attn, layer.input_layernorm, layer.post_attention_layernorm,
            (Projection("qkv_proj", layer.self_attn, "qkv_proj"), Projection("o_proj", layer.self_attn, "o_proj"),
             Projection("gate_up_proj", layer.mlp, "gate_up_proj"), Projection("down_proj", layer.mlp, "down_proj")),
            tuple(layer.self_attn.shard.row_shares),
        ) for layer in self.layers]

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    @property
    def final_norm(self) -> RMSNorm:
        return self.norm

    @property
    def vocab_projection(self) -> nn.Module:
        return self.lm_head

    def use_packed_vocab_projection(self, head: nn.Module,
                                    embedding_from: Callable[[nn.Module], nn.Module]) -> None:
        """`head` (packed from vocab_projection's weight) becomes the vocabulary projection and lm_head itself: the
        plain weight is dropped; a tied embedding table then reads its rows from it (embedding_from(head))."""
        tied = type(self.embed_tokens) is Embedding and self.embed_tokens.weight is self.lm_head.weight
        self.lm_head = self.logits_head = head
        if tied:
            self.embed_tokens = embedding_from(head)

    @contextmanager
    def first_layers(self, n: int) -> Iterator[None]:
        full = self.layers
        self.layers = nn.ModuleList(list(full)[:n])
        try:
            yield
        finally:
            self.layers = full

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden_size]."""
        hidden = self.embed(input_ids)
        if self.float32_residual:
            hidden = hidden.float()
        cos_sin = self.rotary.cos_sin(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(cos_sin, hidden, residual, meta)
        return self.norm(hidden, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of input_ids [T] -> [T, hidden_size]: under tensor parallelism each rank looks up the ids
        in its share of the vocabulary (zeros elsewhere) and the ranks' rows are summed."""
        if not self.tp.is_parallel:
            return self.embed_tokens(input_ids)
        start, end = self.vocab
        held = (input_ids >= start) & (input_ids < end)
        rows = self.embed_tokens((input_ids - start).clamp_(0, end - start - 1))
        return self.tp.all_reduce(rows * held.unsqueeze(-1).to(rows.dtype))

    def _local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of this rank's share of the vocabulary (all of it without tensor parallelism)."""
        if self.logits_head is not None:
            return self.logits_head(hidden)
        # W @ h^T runs the vocab-wide GEMM ~1.7x faster than h @ W^T on CPU at decode batch sizes.
        return torch.mm(self.lm_head.weight, hidden.t()).t().contiguous()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The logits [T, vocab] of the rows of hidden; under tensor parallelism only rank 0 gets them (gathered, in
        float32), the other ranks None: rank 0 samples for all."""
        return self.tp.gather_last_to_first(self._local_logits(hidden), self.vocab_sizes)

    def greedy_token_ids(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """argmax of compute_logits(hidden).float() per row [T] (int64), where the vocabulary projection that
        compute_logits runs for these rows can give it without the logits (bit for bit the same ids); else None."""
        if self.tp.is_parallel:
            return self._greedy_over_ranks(hidden)
        head = self._fused_greedy_head(hidden.shape[0])
        return None if head is None else head.greedy_ids(hidden)

    def _fused_greedy_head(self, rows: int) -> nn.Module | None:
        """What gives this rank's argmax (and its value) of `rows` rows without their logits (greedy_ids): the plan's
        int8 screen for as many rows as it won, else the bf16 panels with float32 outputs (the same sums, the same
        argmax); else None."""
        if self.greedy_screen is not None and rows <= self.greedy_screen[0]:
            return self.greedy_screen[1]
        head = self.logits_head
        if isinstance(head, PlannedLinear):
            head = head.route(rows)
        if isinstance(head, Bf16PanelLinear) and head.out_dtype == torch.float32:
            return head
        return None

    def _greedy_over_ranks(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tensor parallelism: each rank's best logit and its id in its share (fused where the head allows),
        gathered to rank 0, which keeps the best (the lowest rank's on a tie: the first maximum, as argmax over the
        joined logits). The ids on rank 0, an empty tensor on the others."""
        head = self._fused_greedy_head(hidden.shape[0])
        if head is not None:
            values = torch.empty(hidden.shape[0], dtype=torch.float32)
            ids = head.greedy_ids(hidden, values)
        else:
            values, ids = rows_max(self._local_logits(hidden).float().contiguous())
        best = torch.stack([values, (ids + self.vocab[0]).float()], dim=-1)  # ids < 2^24 stay exact in float32
        joined = self.tp.gather_last_to_first(best, [2] * self.tp.world_size)
        if joined is None:
            return torch.empty(0, dtype=torch.int64)
        per_rank = joined.view(hidden.shape[0], self.tp.world_size, 2)
        winner = per_rank[..., 0].argmax(dim=-1, keepdim=True)
        return per_rank[..., 1].gather(1, winner).squeeze(1).long()

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load HF-named weights, merging q/k/v and gate/up. Every parameter must be covered. From a checkpoint
        mapping with raw() (loader/hf.py: CheckpointTensors) only the share this rank keeps is read from each stored
        tensor and cast (in the copy into the parameter): no rank materializes whole tensors."""
        read = getattr(state_dict, "raw", state_dict.__getitem__)
        remaining = set(state_dict)
        if self.tie_word_embeddings:  # .to(dtype) may have given each parameter its own storage: tie again
            self.lm_head.weight = self.embed_tokens.weight
        own = dict(self.named_parameters(remove_duplicate=True))
        loaded: set[str] = set()

        def take(name: str) -> torch.Tensor:
            if name not in remaining:
                raise ValueError(f"checkpoint is missing weight {name!r}")
            remaining.discard(name)
            return read(name)

        heads_dim = _head_dim(self.config)

        def head_rows(w: torch.Tensor, heads: list[int]) -> torch.Tensor:
            """The rows of w [heads * head_dim, ...] of the given global heads, in order."""
            blocks = w.view(-1, heads_dim, *w.shape[1:])
            return torch.cat([blocks[h] for h in heads])

        def head_cols(w: torch.Tensor, heads: list[int]) -> torch.Tensor:
            return head_rows(w.t(), heads).t().contiguous()

        def rank0_only(t: torch.Tensor) -> torch.Tensor:  # a row-parallel layer's bias, added once
            return t if self.tp.rank == 0 else torch.zeros_like(t)

        def put(name: str, tensor: torch.Tensor) -> None:
            param = own[name]
            if param.shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.copy_(tensor)
            loaded.add(name)

        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            q_slots, kv_heads = attn.shard.q_slots, list(attn.shard.kv_heads)

            def qkv(kind: str, p: str = p, q_slots: list = q_slots, kv_heads: list = kv_heads) -> torch.Tensor:
                return torch.cat([head_rows(take(p + f"self_attn.q_proj.{kind}"), q_slots),
                                  head_rows(take(p + f"self_attn.k_proj.{kind}"), kv_heads),
                                  head_rows(take(p + f"self_attn.v_proj.{kind}"), kv_heads)])

            put(f"layers.{i}.self_attn.qkv_proj.weight", qkv("weight"))
            if attn.qkv_proj.bias is not None:
                put(f"layers.{i}.self_attn.qkv_proj.bias", qkv("bias"))
            put(f"layers.{i}.self_attn.o_proj.weight", head_cols(take(p + "self_attn.o_proj.weight"), q_slots))
            if attn.o_proj.bias is not None:
                put(f"layers.{i}.self_attn.o_proj.bias", rank0_only(take(p + "self_attn.o_proj.bias")))
            c0, c1 = layer.mlp.channels
            put(f"layers.{i}.mlp.gate_up_proj.weight", torch.cat(
                [take(p + "mlp.gate_proj.weight")[c0:c1], take(p + "mlp.up_proj.weight")[c0:c1]]))
            put(f"layers.{i}.mlp.down_proj.weight", take(p + "mlp.down_proj.weight")[:, c0:c1].contiguous())
            if layer.mlp.down_proj.bias is not None:
                put(f"layers.{i}.mlp.gate_up_proj.bias", torch.cat(
                    [take(p + "mlp.gate_proj.bias")[c0:c1], take(p + "mlp.up_proj.bias")[c0:c1]]))
                put(f"layers.{i}.mlp.down_proj.bias", rank0_only(take(p + "mlp.down_proj.bias")))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                put(f"layers.{i}.{norm}.weight", take(p + f"{norm}.weight"))
        v0, v1 = self.vocab
        put("embed_tokens.weight", take("model.embed_tokens.weight")[v0:v1])
        put("norm.weight", take("model.norm.weight"))
        if self.tie_word_embeddings:
            remaining.discard("lm_head.weight")
        else:
            put("lm_head.weight", take("lm_head.weight")[v0:v1])
        leftover = sorted(k for k in remaining if "rotary_emb" not in k)
        if leftover:
            raise ValueError(f"checkpoint has unexpected weights: {leftover[:5]}")
        missing = set(own) - loaded
        if missing:
            raise ValueError(f"weights not loaded: {sorted(missing)[:5]}")
