"""The soak's 60-second version (benchmarks/soak.py): `tokenmill serve` with the default model at saturation, with
streamed and plain requests, dropped streams, client timeouts, bad inputs and shared prefixes; every request gets
exactly one final response (or ends by its own client), and afterwards the idle server holds no request, no KV
block, no more RSS (< 5%), file descriptors or threads than after its warm-up, and still answers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_one_minute_soak(tmp_path: Path) -> None:
    soak = _soak_module()
    output = tmp_path / "soak.json"
    status = soak.main(["--minutes", "1", "--concurrency", "12", "--sample-every-s", "2", "--output", str(output),
                        "--log", str(tmp_path / "server.log")])
    report = json.loads(output.read_text())
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert status == 0 and not failed, (failed, report["failures"][:5], report["baseline"], report["end"],
                                        report["fd_targets"])
    outcomes = report["outcomes"]
    # The mix really ran: finished, dropped, timed-out and rejected requests, all in one minute.
    for kind in ("stream/final", "stream_n2/final", "dropped_stream/dropped_by_client", "chat/final"):
        assert outcomes.get(kind, 0) > 0, (kind, outcomes)
    assert any(key.startswith("bad:") and "/rejected_4" in key for key in outcomes)
    assert sum(outcomes.values()) >= 100
