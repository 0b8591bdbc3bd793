#!/usr/bin/env python3
"""End-to-end serving benchmark: rankserve vs. a naive FastAPI server vs. the engine alone, side by side.

    python scripts/bench_serving.py                       # full run, about 5-8 min on a 2-core CPU
    python scripts/bench_serving.py --quick               # about 1 min smoke run
    python scripts/bench_serving.py --concurrency 1 8 32 --duration 12 --max-batch-tokens 8192

Unknown `--flags` are passed through to `rankserve serve` (any settings flag: --max-batch-tokens,
--max-batch-size, --cpu-threads, ...). Results go to --output (default bench-results/) as JSON and Markdown;
the Markdown table is also printed at the end.

What is measured, in one run (docs/performance.md "How to measure"):

- (a) rankserve: `rankserve serve --model DIR --host 127.0.0.1 --port P` in a subprocess;
- (b) naive: scripts/naive_server.py, same checkpoint, same model code and tokenization, one padded forward
  per request, no cross-request batching (the straightforward way a user serves a cross-encoder);
- (c) the engine alone, from rankserve's own /v1/metrics scraped before/after each window:
  engine passages/s = Δrankserve_passages_total / Δrankserve_inference_duration_seconds_sum,
  serving efficiency = end-to-end passages/s ÷ engine passages/s,
  padding efficiency = Δrankserve_batch_real_tokens_total / Δrankserve_batch_computed_tokens_total.
  The naive server's padding efficiency is computed from the workload's own token counts (it pads each
  request to its longest pair).

Both servers are started once and stay up; for each concurrency level the windows alternate
rankserve, naive, rankserve, naive (--reps pairs) and the medians are reported; the speed-up is the median of
the per-pair ratios. Every window sends the same request sequence (request 0, 1, 2, ... of a seeded pool,
cycled if a window outruns it): c clients send back-to-back until --requests have been issued or --duration
seconds have passed, then the requests in flight finish (the drain, bounded by --request-timeout).
Throughput = passages of successful requests ÷ (last completion − window start); latencies are per request.

Workload (`--workload`, stated in every output): RAG-style requests, 1 query of 10-20 tokens × N passages,
passage lengths lognormal with a long tail, clipped at 2048 tokens, text made of English-word sentences so
the real Llama-3 tokenizer gives realistic counts (see scripts/bench_workload.py). Two profiles:
`rag` (10..100 passages, median 128 tokens: the realistic mix, for GPUs or long runs) and `rag-cpu`
(default: 10..20 passages, median 64 tokens, same tail). Why the default is scaled down: the `mid` checkpoint
computes about 2-4 k tokens/s on 2 CPU cores, and a `rag` request holds about 11 k tokens, so 32 clients
would need several minutes per window for a single round of requests.

Load generator (`--load-generator`):

- `aiperf`: NVIDIA's AIPerf (`aiperf profile --endpoint-type nim-rankings`), sending OUR request bodies
  verbatim and in order through its `inputs_json` custom dataset (one session per request), with
  `--concurrency C --request-count N --benchmark-duration S --benchmark-grace-period G`; the per-request
  records of its profile_export.jsonl are mapped back to our requests to count passages. It works offline
  against localhost, with two work-arounds: its `--tokenizer` gets a directory holding only the checkpoint's
  tokenizer files (transformers' AutoTokenizer fails on the checkpoint's own config.json, model type
  `llama_bidirec`), and HF_HUB_OFFLINE must stay unset (offline mode sends local paths to the Hub cache
  lookup). Install it into its own venv, never .venv:
      python3 -m venv /tmp/aiperf-venv && /tmp/aiperf-venv/bin/pip install aiperf==0.13.0
  It is found via --aiperf PATH, $AIPERF, PATH, /tmp/aiperf-venv/bin/aiperf or .bench-venv/bin/aiperf.
  Cost: each window pays ~4-10 s of AIPerf start-up and shutdown (outside the measured window), and its
  services use some CPU on the same 2 cores as the servers (alike for both systems).
- `builtin`: asyncio + httpx, C workers sending back-to-back from the shared ordered request list; checks that
  every response ranks every passage exactly once.
- `auto` (default): aiperf when it is found and starts, builtin otherwise (the reason is printed and noted).

Everything is loopback-only (127.0.0.1), every loop is bounded in count and time, and the servers (and any
aiperf process group) this script starts are stopped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_workload  # sibling module (scripts/ is not a package)

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "nvidia/llama-nemotron-rerank-1b-v2"
SYSTEMS = ("rankserve", "naive")
READY_TIMEOUT_S = 300.0
NO_CAP = 1_000_000  # requests per window when only --duration bounds it
AIPERF_OVERHEAD_S = 120.0  # start-up + shutdown allowance on top of a window's own bound


# -- servers ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        # Own session: a terminal Ctrl-C reaches us only, and we stop the server ourselves (in order).
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base}/v1/health/ready").status_code == 200:
                        return
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT_S:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)  # rankserve: the first SIGTERM drains, the second exits at once
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                return


def rankserve_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "rankserve"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("rankserve")
    return [found] if found else [sys.executable, "-m", "rankserve.cli"]


# -- metrics -----------------------------------------------------------------------------------------------------

ENGINE_METRICS = {
    "passages": "rankserve_passages_total",
    "inference_seconds": "rankserve_inference_duration_seconds_sum",
    "batches": "rankserve_inference_duration_seconds_count",
    "real_tokens": "rankserve_batch_real_tokens_total",
    "computed_tokens": "rankserve_batch_computed_tokens_total",
    "batch_size_sum": "rankserve_batch_size_sum",
    "queue_seconds": "rankserve_queue_duration_seconds_sum",
    "batch_failures": "rankserve_batch_failures_total",
}


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels}` → value for every sample line (no comments)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[key] = float(value)
    return out


def scrape(base: str) -> dict[str, float] | None:
    try:
        r = httpx.get(f"{base}/v1/metrics", timeout=10.0)
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_prometheus(r.text)


def metric_deltas(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    if before is None or after is None:
        return {"error": "could not scrape /v1/metrics"}
    out: dict[str, Any] = {}
    missing = []
    for short, name in ENGINE_METRICS.items():
        if name in after:
            out[short] = after[name] - before.get(name, 0.0)
        else:
            missing.append(name)
    statuses: dict[str, float] = {}
    for key, value in after.items():
        if key.startswith("rankserve_requests_total{") and 'route="/v1/ranking"' in key:
            status = key.split('status="', 1)[1].split('"', 1)[0]
            delta = value - before.get(key, 0.0)
            if delta:
                statuses[status] = delta
    out["ranking_statuses"] = statuses
    if missing:
        out["missing"] = missing
    return out


# -- load generators ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    index: int  # position in the pool
    start: float  # seconds since the window start
    end: float
    status: str  # "200" or the HTTP status / exception name
    ok: bool


def check_response(body: bytes, n_passages: int) -> bool:
    try:
        data = json.loads(body)
        idx = [r["index"] for r in data["rankings"]]
        logits = [r["logit"] for r in data["rankings"]]
    except (ValueError, KeyError, TypeError):
        return False
    return sorted(idx) == list(range(n_passages)) and all(a >= b for a, b in itertools.pairwise(logits))


async def builtin_window(
    base: str, wl: bench_workload.Workload, concurrency: int, max_requests: int, duration: float, timeout: float
) -> tuple[list[Record], int]:
    """Closed loop: `concurrency` workers, back-to-back, ordered requests; returns records and unfinished count."""
    url = f"{base}/v1/ranking"
    headers = {"content-type": "application/json", "accept": "application/json"}
    records: list[Record] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=10.0)) as client:
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal next_index
            while next_index < max_requests and time.perf_counter() - t0 < duration:
                i = next_index
                next_index += 1
                body = wl.payloads[i % len(wl)]
                start = time.perf_counter() - t0
                try:
                    r = await client.post(url, content=body, headers=headers)
                    status = str(r.status_code)
                    ok = r.status_code == 200 and check_response(r.content, wl.passages[i % len(wl)])
                    if r.status_code == 200 and not ok:
                        status = "bad-body"
                except httpx.HTTPError as e:
                    status, ok = type(e).__name__, False
                records.append(Record(i, start, time.perf_counter() - t0, status, ok))

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        # Hard bound: issuing stops at `duration`; the drain may take at most one request timeout more.
        _done, pending = await asyncio.wait(tasks, timeout=duration + timeout + 5.0)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records, next_index - len(records)  # issued but never answered: cut off by the hard bound


def find_aiperf(explicit: str | None) -> str | None:
    for cand in (explicit, os.environ.get("AIPERF"), shutil.which("aiperf"), "/tmp/aiperf-venv/bin/aiperf"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    local = REPO / ".bench-venv" / "bin" / "aiperf"
    return str(local) if local.is_file() else None


class AIPerf:
    def __init__(self, exe: str, wl: bench_workload.Workload, checkpoint: Path, workdir: Path) -> None:
        self.exe = exe
        self.workdir = workdir
        self.inputs = workdir / "inputs.json"
        self.inputs.write_text(json.dumps(wl.aiperf_inputs()), encoding="utf-8")
        # transformers' AutoTokenizer cannot read the checkpoint's config.json (model type llama_bidirec):
        # hand aiperf the tokenizer files alone. It only needs them to start; token counts come from `usage`.
        self.tokenizer = workdir / "tokenizer"
        self.tokenizer.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (checkpoint / name).is_file():
                shutil.copy(checkpoint / name, self.tokenizer / name)
        self.wl = wl
        self.runs = 0

    def version(self) -> str:
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip()

    def window(
        self, base: str, concurrency: int, max_requests: int, duration: float, timeout: float
    ) -> tuple[list[Record], int]:
        self.runs += 1
        art = self.workdir / f"run{self.runs:03d}"
        cmd = [
            self.exe, "profile",
            "--model", MODEL_ID,
            "--url", base,
            "--endpoint-type", "nim-rankings",
            "--custom-dataset-type", "inputs_json",
            "--input-file", str(self.inputs),
            "--concurrency", str(concurrency),
            "--request-count", str(max_requests),
            "--benchmark-duration", f"{duration:g}",
            "--benchmark-grace-period", f"{timeout:g}",
            "--request-timeout-seconds", f"{timeout:g}",
            "--tokenizer", str(self.tokenizer),
            "--use-server-token-count",
            "--no-server-metrics",
            "--no-gpu-telemetry",
            "--workers-max", "1",
            "--record-processors", "1",
            "--ui", "none",
            "--artifact-dir", str(art),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        log = art.with_suffix(".log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                proc.wait(duration + timeout + AIPERF_OVERHEAD_S)
            except BaseException:
                kill_group(proc)
                raise
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
            raise RuntimeError(f"aiperf exited with {proc.returncode}:\n{tail}")
        return self._records(art / "profile_export.jsonl")

    def _records(self, path: Path) -> tuple[list[Record], int]:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            meta = rec["metadata"]
            if meta.get("benchmark_phase", "profiling") != "profiling":
                continue
            rows.append(rec)
        if not rows:
            return [], 0
        t0 = min(r["metadata"]["request_start_ns"] for r in rows)
        records, cancelled = [], 0
        for rec in rows:
            meta = rec["metadata"]
            if meta.get("was_cancelled"):
                cancelled += 1
                continue
            index = int(str(meta["conversation_id"]).lstrip("r"))
            err = rec.get("error")
            status = "200" if not err else str(err.get("code") or err.get("type") or "error")
            records.append(
                Record(
                    index,
                    (meta["request_start_ns"] - t0) / 1e9,
                    (meta["request_end_ns"] - t0) / 1e9,
                    status,
                    not err,
                )
            )
        return records, cancelled


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started with start_new_session=True, and the services it spawned (its own group)."""
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)


# -- one window, summarized ----------------------------------------------------------------------------------------


def summarize(
    system: str,
    concurrency: int,
    rep: int,
    records: list[Record],
    unfinished: int,
    wl: bench_workload.Workload,
    server: dict[str, Any] | None,
) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.status] = errors.get(r.status, 0) + 1
    if unfinished:
        errors["unfinished"] = unfinished
    wall = max((r.end for r in records), default=0.0)
    passages = sum(wl.passages[r.index % len(wl)] for r in ok)
    lat = np.array([(r.end - r.start) * 1000 for r in ok])
    real = sum(sum(wl.pair_tokens[r.index % len(wl)]) for r in ok)
    per_request_padded = sum(
        len(wl.pair_tokens[r.index % len(wl)]) * max(wl.pair_tokens[r.index % len(wl)]) for r in ok
    )
    out: dict[str, Any] = {
        "system": system,
        "concurrency": concurrency,
        "rep": rep,
        "requests_ok": len(ok),
        "errors": errors,
        "error_count": sum(errors.values()),
        "passages_ok": passages,
        "tokens_ok": real,
        "wall_s": wall,
        "passages_per_s": passages / wall if wall > 0 else 0.0,
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "tokens_per_s": real / wall if wall > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if ok else None,
        "p99_ms": float(np.percentile(lat, 99)) if ok else None,
        "mean_ms": float(np.mean(lat)) if ok else None,
        "min_ms": float(np.min(lat)) if ok else None,
    }
    if system == "naive":
        # One padded forward per request: padding efficiency follows from the token counts.
        out["padding_efficiency"] = real / per_request_padded if per_request_padded else None
    if server is not None:
        out["server"] = server
        busy = server.get("inference_seconds")
        p = server.get("passages")
        if busy and p:
            out["engine_passages_per_s"] = p / busy
            out["serving_efficiency"] = out["passages_per_s"] / out["engine_passages_per_s"]
            out["engine_busy_share"] = busy / wall if wall > 0 else None
        computed = server.get("computed_tokens")
        if computed:
            out["padding_efficiency"] = server.get("real_tokens", 0.0) / computed
        batches = server.get("batches")
        if batches:
            out["mean_batch_size"] = server.get("batch_size_sum", 0.0) / batches
            out["mean_batch_computed_tokens"] = computed / batches if computed else None
            out["batches"] = batches
    return out


# -- report -----------------------------------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return statistics.median(vals) if vals else None


def aggregate(windows: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    keys = (
        "passages_per_s",
        "requests_per_s",
        "tokens_per_s",
        "p50_ms",
        "p99_ms",
        "engine_passages_per_s",
        "serving_efficiency",
        "padding_efficiency",
        "mean_batch_size",
        "engine_busy_share",
    )
    for c in levels:
        per_system = {}
        for system in SYSTEMS:
            ws = [w for w in windows if w["system"] == system and w["concurrency"] == c]
            if not ws:
                continue
            per_system[system] = {k: median([w.get(k) for w in ws]) for k in keys}
            per_system[system]["errors"] = sum(w["error_count"] for w in ws)
            per_system[system]["requests"] = sum(w["requests_ok"] for w in ws)
            per_system[system]["windows"] = len(ws)
        ratios = []
        for rep in sorted({w["rep"] for w in windows if w["concurrency"] == c}):
            pair = {w["system"]: w for w in windows if w["concurrency"] == c and w["rep"] == rep}
            if "rankserve" in pair and "naive" in pair and pair["naive"]["passages_per_s"] > 0:
                ratios.append(pair["rankserve"]["passages_per_s"] / pair["naive"]["passages_per_s"])
        rows.append({"concurrency": c, "systems": per_system, "speedup": median(ratios), "speedup_per_rep": ratios})
    return rows


def fmt(value: float | None, digits: int = 1, pct: bool = False) -> str:
    if value is None:
        return "–"
    if pct:
        return f"{100 * value:.0f}%"
    return f"{value:,.{digits}f}"


def load(avg: list[float] | None) -> str:
    return f"{avg[0]:.2f}" if avg else "?"


def render_markdown(result: dict[str, Any]) -> str:
    cfg, wl, machine = result["config"], result["workload"], result["machine"]
    cap = f" or {cfg['max_requests']} requests" if cfg["max_requests"] else ""
    lines = [
        f"# rankserve serving benchmark — {result['date']}",
        "",
        f"Workload: {wl['description']}. Seed {wl['seed']}, pool of {wl['requests_in_pool']} requests "
        f"(cycled). Measured: {wl['passages_per_request']['mean']:.1f} passages/request, "
        f"{wl['tokens_per_request_mean']:,.0f} tokens/request; tokens per pair (template + BOS included) "
        f"mean {wl['pair_tokens']['mean']:.0f}, p50 {wl['pair_tokens']['p50']:.0f}, "
        f"p95 {wl['pair_tokens']['p95']:.0f}, max {wl['pair_tokens']['max']}; "
        f"{100 * wl['pair_tokens']['share_over_500']:.1f}% of pairs over 500 tokens.",
        "",
        f"Load: {cfg['load_generator']} ({cfg['load_generator_note']}); closed loop, per window "
        f"≤{cfg['duration_s']:g} s of issuing{cap} then the drain; "
        f"{cfg['reps']} alternated pair(s) per level (rankserve, naive, ...), medians shown. "
        f"Checkpoint `{cfg['checkpoint']}` ({cfg['checkpoint_info']}).",
        "",
        "| clients | system | passages/s | req/s | p50 ms | p99 ms | errors |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        for system in SYSTEMS:
            s = row["systems"].get(system)
            if s is None:
                continue
            lines.append(
                f"| {row['concurrency']} | {system} | {fmt(s['passages_per_s'])} | {fmt(s['requests_per_s'], 2)} "
                f"| {fmt(s['p50_ms'], 0)} | {fmt(s['p99_ms'], 0)} | {s['errors']} |"
            )
    lines += [
        "",
        "| clients | speed-up vs naive | rankserve engine passages/s | serving efficiency | engine busy / wall "
        "| padding eff. rankserve | padding eff. naive | mean batch size |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        rs = row["systems"].get("rankserve", {})
        nv = row["systems"].get("naive", {})
        speedup = f"{row['speedup']:.2f}×" if row["speedup"] is not None else "–"
        dagger = " †" if (rs.get("engine_busy_share") or 0) > 1.02 else ""
        lines.append(
            f"| {row['concurrency']} | {speedup} | {fmt(rs.get('engine_passages_per_s'))} "
            f"| {fmt(rs.get('serving_efficiency'), pct=True)}{dagger} "
            f"| {fmt(rs.get('engine_busy_share'), pct=True)}{dagger} "
            f"| {fmt(rs.get('padding_efficiency'), pct=True)} | {fmt(nv.get('padding_efficiency'), pct=True)} "
            f"| {fmt(rs.get('mean_batch_size'))} |"
        )
    lines += [
        "",
        "Serving efficiency = end-to-end passages/s ÷ engine passages/s, the latter from rankserve's /v1/metrics "
        "(Δpassages ÷ Δinference_duration_seconds_sum). Engine busy / wall = Δinference_duration_seconds_sum ÷ "
        "window wall time; in a closed loop the two are the same number. † above 100%: impossible for one engine "
        "thread, so the metric counts overlapping time (see Notes) and these two columns are not valid. "
        "Naive padding efficiency: real ÷ padded tokens when each request is padded to its longest pair.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpus']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), Python {machine['python']}, {machine['platform']}; "
        f"1-min load average {load(machine.get('load_average_at_start'))} before the servers started "
        f"(other work on the machine), {load(machine.get('load_average_at_end'))} at the end (ours included).",
        f"Command: `{result['command']}`",
    ]
    if result.get("notes"):
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def window_line(w: dict[str, Any]) -> str:
    line = (
        f"  c={w['concurrency']:<3d} rep {w['rep']} {w['system']:<9s} {w['passages_per_s']:8.1f} passages/s "
        f"{w['requests_per_s']:6.2f} req/s  p50 {fmt(w['p50_ms'], 0):>7s} ms  p99 {fmt(w['p99_ms'], 0):>7s} ms  "
        f"{w['requests_ok']} ok, {w['error_count']} errors, {w['wall_s']:.1f}s ({w['generator_elapsed_s']:.0f}s)"
    )
    if w["system"] == "rankserve":
        line += (
            f"  [engine {w.get('engine_passages_per_s') or 0:.1f} p/s, "
            f"busy/wall {w.get('engine_busy_share') or 0:.2f}, "
            f"padding {w.get('padding_efficiency') or 0:.2f}, batch {w.get('mean_batch_size') or 0:.1f}]"
        )
    return line


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    return {
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# -- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Unknown --flags are passed to `rankserve serve`."
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint dir (default: checkpoints/<size>, made if missing)")
    p.add_argument("--size", default="mid", help="random checkpoint size to generate when --checkpoint is absent")
    p.add_argument("--concurrency", type=int, nargs="+", help="client counts (default 1 8 32; --quick: 1 8)")
    p.add_argument("--requests", type=int, help="max requests issued per window (default: no cap but --duration)")
    p.add_argument("--duration", type=float, help="seconds of issuing per window (default 10; --quick: 4)")
    p.add_argument("--reps", type=int, help="rankserve/naive pairs per concurrency level (default 2; --quick: 1)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="per-request timeout, also the drain bound")
    p.add_argument("--workload", choices=sorted(bench_workload.PROFILES), default="rag-cpu")
    p.add_argument("--pool", type=int, help="requests generated (default 300; --quick: 40); cycled if outrun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=REPO / "bench-results")
    p.add_argument("--load-generator", choices=["auto", "aiperf", "builtin"], default="auto")
    p.add_argument("--aiperf", help="path to the aiperf executable (see the module docstring)")
    p.add_argument("--naive-mode", choices=["lock", "loop"], default="lock", help="see scripts/naive_server.py")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per server before the first window")
    p.add_argument("--quick", action="store_true", help="about one minute: 1 and 8 clients, 4 s windows, 1 pair")
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") and not a.startswith("--")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    q = args.quick
    args.concurrency = args.concurrency or ([1, 8] if q else [1, 8, 32])
    args.duration = args.duration if args.duration is not None else (4.0 if q else 10.0)
    args.reps = args.reps or (1 if q else 2)
    args.pool = args.pool or (40 if q else 300)
    return args, extra


def ensure_checkpoint(args: argparse.Namespace) -> Path:
    if args.checkpoint is not None:
        return args.checkpoint
    path = REPO / "checkpoints" / args.size
    if not (path / "config.json").is_file():
        from rankserve.model.synthetic import write_checkpoint

        print(f"generating a random {args.size} checkpoint in {path} ...", flush=True)
        write_checkpoint(path, args.size)
    return path


def run(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    ckpt = ensure_checkpoint(args)
    config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    ckpt_info = (
        f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, "
        f"{'random weights' if config.get('rankserve_random_weights') else 'real weights'}"
    )
    print(f"building the workload ({args.workload}, {args.pool} requests) ...", flush=True)
    profile = bench_workload.PROFILES[args.workload]
    wl = bench_workload.build(profile, args.pool, args.seed, str(ckpt / "tokenizer.json"))
    print(f"  {wl.stats['description']}", flush=True)
    machine = machine_info()
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    notes: list[str] = []

    generator, gen_note, aiperf = "builtin", "asyncio + httpx", None
    workdir = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    if args.load_generator in ("auto", "aiperf"):
        exe = find_aiperf(args.aiperf)
        try:
            if exe is None:
                raise RuntimeError("no aiperf executable found (see the module docstring to install it)")
            aiperf = AIPerf(exe, wl, ckpt, workdir)
            generator, gen_note = "aiperf", f"NVIDIA AIPerf {aiperf.version()}, nim-rankings, inputs_json"
        except Exception as e:
            if args.load_generator == "aiperf":
                raise SystemExit(f"bench_serving: aiperf unusable: {e}") from None
            aiperf = None
            notes.append(f"aiperf not used ({e}); builtin generator instead")
    print(f"load generator: {generator} ({gen_note})", flush=True)

    servers: dict[str, Server] = {}
    if "rankserve" in args.systems:
        port = free_port()
        cmd = [*rankserve_cmd(), "serve", "--model", str(ckpt), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--log-level", "warning", *extra]
        servers["rankserve"] = Server("rankserve", cmd, port, args.output / f"{stamp}-rankserve.log")
    if "naive" in args.systems:
        port = free_port()
        script = Path(__file__).resolve().parent / "naive_server.py"
        cmd = [sys.executable, str(script), "--model", str(ckpt), "--port", str(port), "--mode", args.naive_mode]
        servers["naive"] = Server("naive", cmd, port, args.output / f"{stamp}-naive.log")

    windows: list[dict[str, Any]] = []
    try:
        for s in servers.values():
            print(f"starting {s.name}: {shlex.join(s.cmd)}", flush=True)
            s.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        for s in servers.values():
            s.wait_ready(deadline)
        print(f"servers ready after {time.monotonic() - started:.0f}s", flush=True)
        for s in servers.values():  # unmeasured: first-call costs (allocator, thread pools, connections)
            asyncio.run(builtin_window(s.base, wl, 1, args.warmup, 300.0, args.request_timeout))

        order = [s for s in SYSTEMS if s in servers]
        cap = args.requests or NO_CAP
        for c in args.concurrency:
            for rep in range(args.reps):
                for system in order:
                    srv = servers[system]
                    before = scrape(srv.base) if system == "rankserve" else None
                    called = time.monotonic()
                    if aiperf is not None:
                        records, unfinished = aiperf.window(srv.base, c, cap, args.duration, args.request_timeout)
                    else:
                        records, unfinished = asyncio.run(
                            builtin_window(srv.base, wl, c, cap, args.duration, args.request_timeout)
                        )
                    after = scrape(srv.base) if system == "rankserve" else None
                    server = metric_deltas(before, after) if system == "rankserve" else None
                    if srv.proc is not None and srv.proc.poll() is not None:
                        raise RuntimeError(f"{system} died during the run; see {srv.log_path}")
                    w = summarize(system, c, rep, records, unfinished, wl, server)
                    w["generator_elapsed_s"] = round(time.monotonic() - called, 1)  # window + generator overhead
                    windows.append(w)
                    print(window_line(w), flush=True)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    for w in windows:
        srv = w.get("server") or {}
        if srv.get("missing"):
            notes.append(f"rankserve metrics missing: {', '.join(srv['missing'])}")
        if (w.get("engine_busy_share") or 0) > 1.02:
            notes.append(
                "rankserve_inference_duration_seconds_sum exceeds the window's wall time "
                f"(c={w['concurrency']}, rep {w['rep']}: {w['engine_busy_share']:.2f}×): it counts overlapping "
                "time (a batch's timer starts before it waits for the single engine thread behind the batch "
                "in flight), so the engine rate is underestimated and the serving efficiency overestimated"
            )
        if "passages" in srv and srv["passages"] != w["passages_ok"]:
            notes.append(
                f"rankserve_passages_total grew by {srv['passages']:.0f} in the c={w['concurrency']} rep {w['rep']} "
                f"window, but the client counted {w['passages_ok']} passages in successful responses"
            )
        statuses = (srv.get("ranking_statuses") or {}).copy()
        statuses.pop("200", None)
        if statuses:
            notes.append(f"rankserve answered non-200 on /v1/ranking (c={w['concurrency']}): {statuses}")
        if w["error_count"]:
            notes.append(f"{w['system']} c={w['concurrency']} rep {w['rep']}: errors {w['errors']}")
    notes = list(dict.fromkeys(notes))

    result = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "config": {
            "checkpoint": str(ckpt),
            "checkpoint_info": ckpt_info,
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "max_requests": args.requests,
            "reps": args.reps,
            "request_timeout_s": args.request_timeout,
            "load_generator": generator,
            "load_generator_note": gen_note,
            "naive_mode": args.naive_mode,
            "rankserve_cmd": servers["rankserve"].cmd if "rankserve" in servers else None,
            "naive_cmd": servers["naive"].cmd if "naive" in servers else None,
            "total_seconds": round(time.monotonic() - started, 1),
        },
        "machine": {**machine, "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "workload": wl.stats,
        "summary": aggregate(windows, args.concurrency),
        "windows": windows,
        "notes": notes,
    }
    markdown = render_markdown(result)
    (args.output / f"{stamp}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.output / f"{stamp}.md").write_text(markdown, encoding="utf-8")
    print()
    print(markdown)
    print(f"wrote {args.output / (stamp + '.json')} and .md ({result['config']['total_seconds']:.0f}s in all)")
    return result


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the finally blocks that stop the servers

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (a `&` job)
    try:
        run(args, extra)
    except KeyboardInterrupt:
        print("\ninterrupted: servers stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
