"""Tensor parallelism over two "machines": two network namespaces joined by a veth pair, node 0 (the engine, an
offline LLM) in one and node 1 (`tokenmill serve --node-rank 1`, ranks only) in the other, gloo over that link.
Greedy tokens and top-5 logprobs match one rank in float32 (one rank a node, and two a node summing through shared
memory within each node), and node 1 exits cleanly when the engine closes. The
test creates and removes the namespaces itself; it skips where it may not (no root, no `ip`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
PROMPTS = ["The quick brown fox", [5, 17, 300, 42, 9, 1000, 7]]
SUBNET = "10.231.77"
NODE0_SCRIPT = """
import json, sys
from tokenmill import LLM, SamplingParams
if __name__ == "__main__":
    model, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    with LLM(model=model, tensor_parallel_size={tp}, nnodes=2, node_rank=0, master_addr="{addr}", master_port=port,
             dtype="float32", max_model_len=128, kv_cache_memory=16 << 20) as llm:
        outs = llm.generate({prompts!r}, params, use_tqdm=False)
        comm = llm.engine.core.worker.tp
        assert (comm.shm is not None) == ({tp} > 2) and comm.spans_nodes == ({tp} > 2)
    result = [[o.outputs[0].token_ids, [{{str(t): lp.logprob for t, lp in pos.items()}} for pos in o.outputs[0].logprobs]]
              for o in outs]
    json.dump(result, open(out, "w"))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    """(namespace A, namespace B, interface in A, interface in B): A at SUBNET.1, B at SUBNET.2."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2's `ip` to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    a, b, va, vb = f"tm-a-{tag}", f"tm-b-{tag}", f"tma{tag}", f"tmb{tag}"
    try:
        _ip("netns", "add", a)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, host in ((a, va, 1), (b, vb, 2)):
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b, va, vb
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.mark.parametrize("tp", [2, 4])
def test_two_nodes_over_a_veth_link_match_one_rank(tiny_checkpoint, two_hosts, tmp_path: Path, tp: int) -> None:
    """tp = 4: two ranks a node, which sum in shared memory within the node and over gloo between the nodes."""
    a, b, va, vb = two_hosts
    model = str(tiny_checkpoint("llama"))
    with LLM(model=model, dtype="float32", max_model_len=128, kv_cache_memory=16 << 20) as llm:
        expected = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, PARAMS,
                                                                                          use_tqdm=False)]
    port = "29517"
    script = tmp_path / "node0.py"
    script.write_text(NODE0_SCRIPT.format(addr=f"{SUBNET}.1", prompts=PROMPTS, tp=tp))
    out = tmp_path / "node0.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    node1 = subprocess.Popen(
        ["ip", "netns", "exec", b, "env", f"GLOO_SOCKET_IFNAME={vb}", sys.executable, "-m",
         "tokenmill.entrypoints.cli", "serve", "--model", model, "--tensor-parallel-size", str(tp), "--nnodes", "2",
         "--node-rank", "1", "--master-addr", f"{SUBNET}.1", "--master-port", port, "--dtype", "float32",
         "--max-model-len", "128", "--kv-cache-memory", str(16 << 20)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        node0 = subprocess.run(
            ["ip", "netns", "exec", a, "env", f"GLOO_SOCKET_IFNAME={va}", sys.executable, str(script), model, port,
             str(out)], check=False, env=env, capture_output=True, timeout=300)
        assert node0.returncode == 0, node0.stdout.decode()[-3000:] + node0.stderr.decode()[-3000:]
        assert node1.wait(timeout=60) == 0, node1.stdout.read().decode()[-3000:]
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    got = json.loads(out.read_text())
    for (want_ids, want_lps), (ids, lps) in zip(expected, got, strict=True):
        assert ids == want_ids
        for want, have in zip(want_lps, lps, strict=True):
            assert {str(t) for t in want} == set(have)
            assert all(abs(have[str(t)] - lp.logprob) < 1e-4 for t, lp in want.items())
