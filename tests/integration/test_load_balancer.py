"""deploy/nginx/rankserve.conf in front of two real `rankserve serve` replicas, with a real nginx, on loopback.

Under load from several client threads one replica is SIGKILLed: every request must still be answered 200 with the
right ranking (nginx retries POSTs on the survivor, `non_idempotent` being enabled deliberately), and afterwards the
dead replica must be out of rotation (no request even tries it). nginx's JSON access log says which replica(s)
each request went to.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration._cli import CliServer, start_cli
from tests.integration._support import Reference, assert_matches_reference, free_port, ranking_body

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "nginx" / "rankserve.conf"

CLIENT_THREADS = 4
REQUESTS_PER_THREAD = 25
KILL_AFTER = 16  # completed requests before one replica is killed
AFTER_REQUESTS = 8  # sequential requests once the load is over: none may try the dead replica
DRAIN_SECONDS = 2  # the replicas' shutdown_drain_seconds (SIGTERM: readiness and new requests 503 this long)

QUERIES = ["which way should i go?", "how much protein should a female eat", "what is a reranker", "ports and docks"]
PASSAGES = [
    "two roads diverged in a yellow wood, and sorry I could not travel both",
    "then took the other, as just as fair, and having perhaps the better claim",
    "As a general guideline, the CDC average requirement of protein for women is 46 grams per day.",
    "Definition of summit for English Language Learners.",
    "A cross-encoder scores a query and a passage together and returns one logit.",
    "The harbour master assigns each ship a berth before it enters the port.",
]


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        pytest.skip("nginx is not installed (Debian package `nginx`; .ci/run installs it)")
    return path


def render_site(template: str, replicas: list[str], listen_port: int, access_log: Path) -> str:
    """The deploy config with the test's addresses: one upstream `server` line per replica (keeping the template's
    parameters), the listen port on loopback and the access log in the test's folder. Nothing else changes."""
    upstream = re.search(r"upstream rankserve \{.*?\n\}", template, re.S)
    assert upstream is not None, "the template must define `upstream rankserve`"
    block = upstream.group(0)
    servers = re.findall(r"^([ \t]*)server[ \t]+\S+([ \t][^;\n]*)?;.*$", block, re.M)
    assert servers, "the upstream must list replicas"
    indent, params = servers[0]
    lines = "\n".join(f"{indent}server {addr}{params or ''};" for addr in replicas)
    new_block = re.sub(r"^[ \t]*server[ \t]+\S+([ \t][^;\n]*)?;.*\n", "", block, flags=re.M)
    new_block = new_block.replace("{\n", "{\n" + lines + "\n", 1)
    site = template.replace(block, new_block)
    site, n_listen = re.subn(r"^(\s*)listen\s+\d+;", rf"\1listen 127.0.0.1:{listen_port};", site, flags=re.M)
    site, n_log = re.subn(r"access_log\s+\S+\s+rankserve_json;", f"access_log {access_log} rankserve_json;", site)
    assert n_listen == 1 and n_log == 1, "the template's listen/access_log lines changed: update render_site"
    return site


def main_conf(prefix: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf does for the site, with every path in the test's folder (nginx runs unprivileged)."""
    temps = "\n".join(
        f"    {kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"worker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} info;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n{temps}\n    include {site};\n}}\n"
    )


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    url: str
    prefix: Path
    access_log: Path

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]


def write_config(prefix: Path, replicas: list[str], port: int) -> tuple[Path, Path]:
    access_log = prefix / "access.log"
    site = prefix / "rankserve.conf"
    site.write_text(render_site(TEMPLATE.read_text(), replicas, port, access_log))
    conf = prefix / "nginx.conf"
    conf.write_text(main_conf(prefix, site))
    return conf, access_log


def nginx_cmd(binary: str, prefix: Path, conf: Path, *extra: str) -> list[str]:
    return [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"), *extra]


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Nginx] = []

    def start(replicas: list[str]) -> Nginx:
        binary = nginx_binary()
        prefix = tmp_path / "nginx"
        prefix.mkdir(exist_ok=True)
        port = free_port()
        conf, access_log = write_config(prefix, replicas, port)
        proc = subprocess.Popen(
            nginx_cmd(binary, prefix, conf, "-g", "daemon off;"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        nginx = Nginx(proc, f"http://127.0.0.1:{port}", prefix, access_log)
        started.append(nginx)
        deadline = time.monotonic() + 15
        with httpx.Client(base_url=nginx.url, timeout=2) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"nginx exited with {proc.returncode}:\n{nginx.error_log()}")
                try:
                    if client.get("/nginx/health").status_code == 200:
                        return nginx
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start:\n{nginx.error_log()}")
                time.sleep(0.05)

    yield start
    for nginx in started:
        if nginx.proc.poll() is None:
            nginx.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight, flush the logs
            try:
                nginx.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                nginx.proc.kill()
                nginx.proc.wait(timeout=5)


def test_deploy_config_passes_nginx_check(tmp_path: Path) -> None:
    binary = nginx_binary()
    conf, _ = write_config(tmp_path, ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"], free_port())
    result = subprocess.run(nginx_cmd(binary, tmp_path, conf, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_render_keeps_the_template_parameters() -> None:
    site = render_site(TEMPLATE.read_text(), ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"], 9000, Path("/x"))
    servers = re.findall(r"^[ \t]*server[ \t]+(\S+)[ \t]+(.*);$", site, re.M)
    assert [s[0] for s in servers] == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    assert all("max_fails=" in s[1] and "fail_timeout=" in s[1] for s in servers)
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in site
    assert "listen 127.0.0.1:9000;" in site


@dataclass
class Outcome:
    request_id: str
    body: int
    started: float
    finished: float
    status: int
    response: Any


def scenario(
    nginx_factory: Any, checkpoint_dir: Path, tmp_path: Path, reference: Reference, stop_signal: signal.Signals
) -> tuple[list[dict[str, Any]], CliServer]:
    """Two replicas behind nginx; load from CLIENT_THREADS threads; `stop_signal` to the first replica after
    KILL_AFTER answers; then AFTER_REQUESTS sequential requests. Checks every answer and the rotation; returns the
    nginx log lines and the stopped replica."""
    bodies = [
        (ranking_body(q, PASSAGES[i % 3 : i % 3 + 4], truncate="END"), q, PASSAGES[i % 3 : i % 3 + 4])
        for i, q in enumerate(QUERIES)
    ]
    expected = [reference.logits(q, passages) for _, q, passages in bodies]

    replicas: list[CliServer] = []
    try:
        for _ in range(2):
            flags = ("--cpu-threads", "1", "--shutdown-drain-seconds", str(DRAIN_SECONDS))
            replicas.append(start_cli(checkpoint_dir, tmp_path, *flags))
        addrs = [r.url.removeprefix("http://") for r in replicas]
        victim, survivor = addrs
        nginx = nginx_factory(addrs)

        outcomes: list[Outcome] = []
        truncated: list[tuple[str, float]] = []  # (request id, when it was sent)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def client_thread(tid: int) -> None:
            try:
                with httpx.Client(base_url=nginx.url, timeout=60) as client:
                    for i in range(REQUESTS_PER_THREAD):
                        b = (tid + i) % len(bodies)
                        for rid in (f"load-{tid}-{i}", f"load-{tid}-{i}-again"):
                            t0 = time.monotonic()
                            try:
                                r = client.post("/v1/ranking", json=bodies[b][0], headers={"X-Request-ID": rid})
                            except httpx.RemoteProtocolError as e:
                                # The one case nginx cannot retry: the replica died after nginx had passed its
                                # response header on. The body is cut short; the client retries (checked below).
                                if rid.endswith("-again") or "complete message body" not in str(e):
                                    raise
                                with lock:
                                    truncated.append((rid, t0))
                                continue
                            body = r.json() if r.status_code == 200 else r.text
                            with lock:
                                outcomes.append(Outcome(rid, b, t0, time.monotonic(), r.status_code, body))
                            break
            except BaseException as e:  # surfaced below: a transport error is a request not answered
                errors.append(e)

        threads = [threading.Thread(target=client_thread, args=(t,), daemon=True) for t in range(CLIENT_THREADS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(outcomes) < KILL_AFTER and time.monotonic() < deadline and not errors:
            time.sleep(0.002)
        assert len(outcomes) >= KILL_AFTER, f"load did not get going: {errors}"
        stopped_at = time.monotonic()
        replicas[0].proc.send_signal(stop_signal)
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "client threads did not finish"
        assert not errors, errors
        replicas[0].proc.wait(timeout=DRAIN_SECONDS + 30)

        # Every request answered, with the right ranking.
        assert len(outcomes) == CLIENT_THREADS * REQUESTS_PER_THREAD
        for out in outcomes:
            assert out.status == 200, (out.request_id, out.status, out.response)
            assert_matches_reference(out.response, expected[out.body])
        assert sum(out.started > stopped_at for out in outcomes) >= CLIENT_THREADS, "the load goes on after the stop"

        # Once the load is over: requests go to the survivor.
        with httpx.Client(base_url=nginx.url, timeout=30) as client:
            for i in range(AFTER_REQUESTS):
                r = client.post("/v1/ranking", json=bodies[i % len(bodies)][0], headers={"X-Request-ID": f"after-{i}"})
                assert r.status_code == 200, r.text
                assert_matches_reference(r.json(), expected[i % len(bodies)])
                assert r.headers["x-request-id"] == f"after-{i}", "the client's id reaches the replica and comes back"
            # Without one, nginx makes the id: the replica uses it, returns it, and nginx logs the same.
            r = client.post("/v1/ranking", json=bodies[0][0])
            assert r.status_code == 200, r.text
            generated = r.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", generated), generated

        # nginx writes a request's log line after its last byte has gone out: wait (bounded) for the last one.
        deadline = time.monotonic() + 10
        while generated not in (lines := {line["request_id"]: line for line in nginx.log_lines()}):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert set(lines) >= {out.request_id for out in outcomes}, "nginx must log every request with its id"
        assert generated in lines, "nginx logs the id it made, the one the replica returned"
        tried = {rid: [a.strip() for a in line["upstream_addr"].split(",")] for rid, line in lines.items()}
        before = [out for out in outcomes if out.finished < stopped_at]
        assert {a for out in before for a in tried[out.request_id]} == {victim, survivor}, "both replicas served"
        retried = [rid for rid, addrs_ in tried.items() if addrs_[:1] == [victim] and addrs_[-1] == survivor]
        assert retried, "some request must have gone to the stopped replica and been retried on the survivor"
        in_flight = sum(out.started < stopped_at < out.finished for out in outcomes)
        print(
            f"\n{stop_signal.name}: {len(outcomes)} requests, {in_flight} in flight at the signal, retried: {retried}"
        )
        # A truncated response: only on the replica that died, for a request sent before it died, and at most one
        # per client (the requests in flight). Never when the replica drains (SIGTERM).
        print(f"{len(truncated)} response(s) cut short, retried by the client: {truncated}")
        assert stop_signal == signal.SIGKILL or not truncated, truncated
        assert len(truncated) <= CLIENT_THREADS
        for rid, sent in truncated:
            assert tried[rid] == [victim] and sent < stopped_at, (lines[rid], sent, stopped_at)
        for rid, line in lines.items():
            if rid not in dict(truncated):
                assert line["status"] == 200, line
            assert tried[rid][-1] in (victim, survivor)

        # nginx's passive health check took the replica out of rotation ...
        disabled = rf'upstream server temporarily disabled .*upstream: "http://{re.escape(victim)}/'
        assert re.search(disabled, nginx.error_log()), nginx.error_log()
        # ... so the requests after the load go straight to the survivor. nginx gives a failed replica one request
        # again each `fail_timeout`: on a machine so slow that this passed, that one request may try it first.
        fail_timeout = float(re.search(r"fail_timeout=(\d+)s", TEMPLATE.read_text()).group(1))  # type: ignore[union-attr]
        victim_tried_at = sorted(line["msec"] for rid, line in lines.items() if victim in tried[rid])
        for i in range(AFTER_REQUESTS):
            line = lines[f"after-{i}"]
            if tried[f"after-{i}"] != [survivor]:
                assert tried[f"after-{i}"] == [victim, survivor], line
                previous = max(t for t in victim_tried_at if t < line["msec"])
                assert line["msec"] - previous >= fail_timeout - 2, ("the stopped replica was still in rotation", line)
        assert replicas[1].proc.poll() is None, "the survivor must still be running"
        return [lines[rid] for rid in retried], replicas[0]
    finally:
        for r in replicas:
            r.stop()


@pytest.mark.timeout(240)
def test_replica_killed_under_load(
    nginx_factory: Any, tiny_checkpoint_dir: Path, tmp_path: Path, reference: Reference
) -> None:
    """SIGKILL: the requests in flight on the dead replica are reset, nginx resends them (POST, deliberately)."""
    retried, dead = scenario(nginx_factory, tiny_checkpoint_dir, tmp_path, reference, signal.SIGKILL)
    assert dead.proc.returncode == -signal.SIGKILL
    assert all(line["upstream_status"].split(", ")[-1] == "200" for line in retried)


@pytest.mark.timeout(240)
def test_replica_drained_under_load(
    nginx_factory: Any, tiny_checkpoint_dir: Path, tmp_path: Path, reference: Reference
) -> None:
    """SIGTERM (a rolling update): the draining replica finishes what it has, answers 503 to new requests, which
    nginx sends to the other replica; then it exits cleanly."""
    retried, drained = scenario(nginx_factory, tiny_checkpoint_dir, tmp_path, reference, signal.SIGTERM)
    assert drained.proc.returncode == 0, drained.log()
    assert any(line["upstream_status"].startswith("503, ") for line in retried), retried
