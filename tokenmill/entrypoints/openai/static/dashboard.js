// tokenmill dashboard: polls dashboard/data (relative to the page, so it works behind a path prefix) about once a
// second and shows it. Every number comes from that JSON; a missing value (null) is shown as "—", never NaN.
"use strict";

(() => {
  const POLL_MS = 1000;
  const TIMEOUT_MS = 5000;
  const HISTORY = 300; // chart points: the last 5 minutes at one poll a second
  const series = { gen: [], prompt: [], running: [], waiting: [] };
  let planShown = null; // the plan JSON last rendered (it never changes while the server runs)

  const $ = (id) => document.getElementById(id);

  function setText(id, text) {
    const el = $(id);
    if (el.textContent !== text) el.textContent = text;
  }

  const isNumber = (v) => typeof v === "number" && Number.isFinite(v);
  const count = (v) => (isNumber(v) ? Math.round(v).toLocaleString("en-US") : "—");
  const rate = (v) => (isNumber(v) ? v.toFixed(v < 10 ? 2 : 1) : "—");
  const percent = (v) => (isNumber(v) ? (100 * v).toFixed(1) + "%" : "—");
  const duration = (v) => {
    if (!isNumber(v)) return "—";
    return v < 1 ? (1000 * v).toFixed(1) + " ms" : v.toFixed(2) + " s";
  };

  function push(list, value) {
    list.push(isNumber(value) ? value : null);
    if (list.length > HISTORY) list.shift();
  }

  // Draws each list of values as a line over the last HISTORY points, scaled to the largest value shown.
  function drawChart(canvasId, lines) {
    const canvas = $(canvasId);
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const values = lines.flatMap((line) => line.values).filter(isNumber);
    const top = Math.max(1, ...values);
    const style = getComputedStyle(document.documentElement);
    for (const line of lines) {
      ctx.strokeStyle = style.getPropertyValue(line.color).trim() || "#888";
      ctx.lineWidth = 1.5 * ratio;
      ctx.beginPath();
      let drawing = false;
      line.values.forEach((v, i) => {
        if (!isNumber(v)) {
          drawing = false;
          return;
        }
        const x = ((i + HISTORY - line.values.length) / (HISTORY - 1)) * width;
        const y = height - (v / top) * (height - 2 * ratio) - ratio;
        if (drawing) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
        drawing = true;
      });
      ctx.stroke();
    }
  }

  function setStatus(kind, text, problem) {
    const status = $("status");
    status.className = "status status-" + kind;
    status.textContent = text;
    const banner = $("banner");
    banner.hidden = !problem;
    if (problem) banner.textContent = problem;
  }

  function renderLatency(name, window) {
    for (const p of ["p50", "p90", "p99"]) setText(`${name}-${p}`, duration(window ? window[p] : null));
    setText(`${name}-count`, count(window ? window.count : 0));
  }

  function renderMetrics(data) {
    const throughput = data.throughput || {};
    const requests = data.requests || {};
    setText("gen-rate", rate(throughput.generation_tokens_per_s));
    setText("prompt-rate", rate(throughput.prompt_tokens_per_s));
    setText("gen-total", count(data.tokens ? data.tokens.generation : null));
    setText("prompt-total", count(data.tokens ? data.tokens.prompt : null));
    setText("running", count(requests.running));
    setText("waiting", count(requests.waiting));
    const finished = requests.finished || {};
    const reasons = Object.keys(finished);
    setText("finished", reasons.length ? reasons.map((r) => `${r} ${count(finished[r])}`).join(" · ") : "—");
    const usage = data.kv_cache ? data.kv_cache.usage : null;
    setText("kv-usage", percent(usage));
    $("kv-bar").style.width = isNumber(usage) ? Math.min(100, 100 * usage) + "%" : "0";
    const prefix = data.prefix_cache || {};
    setText("prefix-hit-rate", percent(prefix.hit_rate));
    setText("prefix-hits", count(prefix.hits));
    setText("prefix-queries", count(prefix.queries));
    const latency = data.latency || {};
    if (latency.ttft) setText("latency-window", String(Math.round(latency.ttft.window_s / 60)));
    renderLatency("ttft", latency.ttft);
    renderLatency("tpot", latency.tpot);
    setText("engine-steps", count(data.engine_steps));
    setText("preemptions", count(data.preemptions));
    setText("in-flight", count(data.in_flight));
    push(series.gen, throughput.generation_tokens_per_s);
    push(series.prompt, throughput.prompt_tokens_per_s);
    push(series.running, requests.running);
    push(series.waiting, requests.waiting);
    drawChart("gen-chart", [{ values: series.gen, color: "--accent" }]);
    drawChart("prompt-chart", [{ values: series.prompt, color: "--accent" }]);
    drawChart("requests-chart", [
      { values: series.running, color: "--accent" },
      { values: series.waiting, color: "--accent2" },
    ]);
  }

  // The choices of one operation as runs of equal kernels over its increasing buckets; a size between two buckets
  // runs the kernel of the next bucket up, beyond the last the last's (worker/plan.py).
  function routes(choices) {
    const runs = [];
    for (const choice of choices) {
      const last = runs[runs.length - 1];
      if (last && last.kernel === choice.kernel) last.rows = choice.rows;
      else runs.push({ kernel: choice.kernel, rows: choice.rows });
    }
    if (runs.length === 1) return `${runs[0].kernel} (all sizes)`;
    return runs
      .map((run, i) => (i === runs.length - 1 ? `> ${runs[i - 1].rows}` : `≤ ${run.rows}`) + `: ${run.kernel}`)
      .join(" · ");
  }

  function row(texts) {
    const tr = document.createElement("tr");
    for (const text of texts) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }

  function renderPlan(plan) {
    const shown = JSON.stringify(plan);
    if (shown === planShown) return;
    planShown = shown;
    const available = Boolean(plan && plan.available);
    $("plan-routes").hidden = !available;
    $("plan-details").hidden = !available;
    if (!available) {
      setText("plan-summary", plan ? plan.reason : "—");
      return;
    }
    const built = plan.cached ? "read from the plan cache" : `built in ${plan.build_seconds.toFixed(1)} s`;
    setText("plan-summary", `${plan.choices.length} choices, ${built}; machine: ${plan.machine}`);
    const byOperation = new Map();
    for (const choice of plan.choices) {
      if (!byOperation.has(choice.operation)) byOperation.set(choice.operation, []);
      byOperation.get(choice.operation).push(choice);
    }
    $("plan-routes-body").replaceChildren(
      ...[...byOperation].map(([operation, choices]) =>
        row([operation, routes([...choices].sort((a, b) => a.rows - b.rows))])),
    );
    $("plan-body").replaceChildren(
      ...plan.choices.map((choice) => {
        const times = Object.entries(choice.seconds).sort((a, b) => a[1] - b[1]);
        const candidates = times.map(([kernel, s]) => `${kernel} ${(1000 * s).toFixed(3)}`).join(", ");
        return row([choice.operation, String(choice.rows), choice.kernel, candidates]);
      }),
    );
  }

  function render(data) {
    setText("model", data.model || "—");
    setText("version", data.version ? "v" + data.version : "");
    setText("updated", "updated " + new Date().toLocaleTimeString());
    if (!data.engine || !data.engine.alive) {
      const why = data.engine && data.engine.error ? data.engine.error : "not running";
      setStatus("bad", "engine dead", `The engine is not serving: ${why}. The numbers below are its last state.`);
    } else if (!data.metrics_enabled) {
      setStatus("wait", "no metrics", "This server records no metrics: only the execution plan can be shown.");
    } else {
      setStatus("ok", "live", null);
    }
    if (data.metrics_enabled) renderMetrics(data);
    renderPlan(data.plan);
  }

  async function poll() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch("dashboard/data", { cache: "no-store", signal: controller.signal });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
    } catch (err) {
      setStatus("bad", "unreachable", `Cannot reach the server (${err.message}); retrying every second.`);
    } finally {
      clearTimeout(timer);
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
