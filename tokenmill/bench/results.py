"""Where benchmark reports go: benchmarks/results/<name>-<timestamp>.json unless a path is given."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("benchmarks/results")


def write_json_report(report: dict[str, Any], name: str, path: str | Path | None = None) -> Path:
    """Writes `report` as indented JSON to `path`, or to RESULTS_DIR/<name>-<timestamp>.json; returns the path.
    Every report names the machine it was measured on (worker/capabilities.py: CPU, ISA flags, oneDNN AMX)."""
    from tokenmill.worker.capabilities import detect_capabilities

    report.setdefault("machine", detect_capabilities().summary())
    out = Path(path) if path else RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out
