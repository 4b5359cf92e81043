"""The CUDA-graph decode path's inputs, without a GPU: static buffers filled per step, the batch padded
to its bucket with rows that read and write no KV, attention sized by the length bound. A stand-in
"graph" reruns the model eagerly on the static buffers; the real capture runs in the GPU check."""

from __future__ import annotations

import torch

from tests.kernels.test_torch_attention import _metadata
from tests.kernels.test_triton_attention import _on
from tokenmill.attention.triton_backend import TritonAttentionBackend
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.cuda_graphs import DecodeCudaGraphs
from tokenmill.worker.request_states import RequestState, StepRequest

BLOCK = 8


class _EagerReplay(DecodeCudaGraphs):
    def _capture(self, size: int) -> None:
        self.outputs[size] = self.model(self.ints[0, :size], self.ints[1, :size], self._metadata(size))

    def _replay(self, size: int) -> None:
        self.outputs[size].copy_(self.model(self.ints[0, :size], self.ints[1, :size], self._metadata(size)))


def _tiny_model(device: torch.device) -> LlamaForCausalLM:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    backend = TritonAttentionBackend(decode_block_n=16, prefill_block_m=16, prefill_block_n=16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg, backend, 64, torch.float32, device)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def _bind(model: LlamaForCausalLM, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer, cache in zip(model.attention_layers, caches):
        layer.kv_cache = cache


@torch.inference_mode()
def test_padded_replay_matches_eager_decode(device) -> None:
    model = _tiny_model(device)
    shape = model.attention_layers[0].backend.kv_cache_shape(16, BLOCK, 2, 16)
    caches = [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in range(2)]
    _bind(model, caches)
    gen = torch.Generator().manual_seed(1)
    lengths, tables = [5, 17, 30], [[3], [0, 7, 9], [1, 2, 4, 5]]
    prompts = [torch.randint(0, 100, (n + 1,), generator=gen).tolist() for n in lengths]
    meta = _metadata([(0, n) for n in lengths], tables, BLOCK)
    ids = torch.tensor([t for p, n in zip(prompts, lengths) for t in p[:n]])
    positions = torch.cat([torch.arange(n) for n in lengths])
    model(ids.to(device), positions.to(device), _on(meta, device))  # prefill: the contexts' KV

    graph_caches = [(k.clone(), v.clone()) for k, v in caches]
    decode = _metadata([(n, 1) for n in lengths], tables, BLOCK)
    eager = model(torch.tensor([p[-1] for p in prompts]).to(device), torch.tensor(lengths).to(device),
                  _on(decode, device))

    _bind(model, graph_caches)
    graphs = _EagerReplay(model, [1, 2, 4, 8], BLOCK, 64, device)
    graphs.capture()  # runs only padding rows: must leave the cache untouched
    for (k0, v0), (k1, v1) in zip(caches, graph_caches):
        assert not torch.equal(k0, k1)  # the eager decode wrote its new rows into `caches`
    scheduled = [StepRequest(RequestState(f"r{i}", list(p), list(p), SamplingParams(), None, list(t)), n, 1)
                 for i, (p, n, t) in enumerate(zip(prompts, lengths, tables))]
    assert graphs.can_run(scheduled)
    replayed = graphs.run(scheduled)  # 3 requests padded to the bucket of 4
    torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
    for (k0, v0), (k1, v1) in zip(caches, graph_caches):  # same rows written, padding wrote nothing
        torch.testing.assert_close(k1, k0, atol=1e-5, rtol=1e-5)  # layer 2 sees layer 1 split differently
        torch.testing.assert_close(v1, v0, atol=1e-5, rtol=1e-5)
