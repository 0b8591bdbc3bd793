"""Longer abuse runs than the test suite: schemathesis with many examples, the hostile corpus, repeated overload
bursts with an RSS leak figure, printing figures for docs/reliability.md.

    python scripts/fuzz_soak.py --examples 300 --bursts 10 --burst-size 200

Needs the dev extra (schemathesis, psutil). Servers run on loopback: an in-process one for the fuzzing, a
`rankserve serve` subprocess for the RSS figure. A tiny random-weight checkpoint is generated in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402
from tests.integration._cli import start_cli  # noqa: E402
from tests.integration._support import ServerThread, ranking_body, running, tiny_settings  # noqa: E402
from tests.integration.test_hostile_input import CORPUS, MALFORMED, raw_exchange, status_of  # noqa: E402
from tests.integration.test_overload import burst  # noqa: E402

from rankserve.model.synthetic import write_checkpoint  # noqa: E402


def fuzz_operation(url: str, operation: object, mode: GenerationMode, examples: int) -> tuple[dict, list[str]]:
    statuses: dict[int, int] = {}
    failed: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))  # type: ignore[attr-defined]
    def run(case: object) -> None:
        r = case.call(base_url=url, timeout=60)  # type: ignore[attr-defined]
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        try:
            case.validate_response(r, excluded_checks=[positive_data_acceptance])  # type: ignore[attr-defined]
        except BaseException as e:  # collect and go on
            failed.append(str(e).splitlines()[0][:160])

    with contextlib.suppress(Unsatisfiable):  # negative mode on an operation without inputs
        run()
    return statuses, failed


def fuzz(url: str, examples: int) -> None:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    total, failures, server_errors = 0, 0, 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            statuses, failed = fuzz_operation(url, operation, mode, examples)
            n = sum(statuses.values())
            total += n
            failures += len(failed)
            server_errors += sum(v for k, v in statuses.items() if k >= 500)
            print(f"  {operation.label:45} {mode.value:8} {n:5} requests {dict(sorted(statuses.items()))}")
            for f in sorted(set(failed))[:3]:
                print(f"      check failed: {f}")
    elapsed = time.monotonic() - started
    print(f"schemathesis: {total} requests, {server_errors} 5xx, {failures} check failures, {elapsed:.0f}s")


def hostile(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        ok = 0
        for name, path, body, content_type, expected in CORPUS:
            headers = {"Content-Type": content_type} if content_type else {}
            r = client.post(path, content=body, headers=headers)
            ok += r.status_code in expected
            if r.status_code not in expected:
                print(f"  UNEXPECTED {name}: {r.status_code} {r.text[:120]}")
    statuses = {name: status_of(raw_exchange(url, payload, half_close=hc)) for name, payload, hc in MALFORMED}
    print(f"hostile corpus: {ok}/{len(CORPUS)} as expected; malformed HTTP: {statuses}")


def soak(checkpoint: Path, tmp: Path, bursts: int, size: int) -> None:
    server = start_cli(
        checkpoint, tmp, "--max-queue-tokens", "4000", "--max-batch-size", "16", "--log-level", "warning"
    )
    try:
        proc = psutil.Process(server.proc.pid)
        body = ranking_body(
            "what holds under load?", [f"passage {i} about load shedding and queues" for i in range(60)]
        )
        rss = [proc.memory_info().rss / 2**20]
        for i in range(bursts):
            started = time.monotonic()
            results = asyncio.run(burst(server.url, size, body, 120))
            elapsed = time.monotonic() - started
            codes: dict[object, int] = {}
            lat = sorted(t for r, t in results if isinstance(r, httpx.Response) and r.status_code == 200)
            for r, _ in results:
                key = r.status_code if isinstance(r, httpx.Response) else type(r).__name__
                codes[key] = codes.get(key, 0) + 1
            rss.append(proc.memory_info().rss / 2**20)
            p50 = lat[len(lat) // 2] if lat else float("nan")
            print(
                f"  burst {i + 1}: {size} requests in {elapsed:.1f}s {codes}, 200 latency p50 {p50:.2f}s "
                f"max {lat[-1] if lat else float('nan'):.2f}s, RSS {rss[-1]:.1f} MiB"
            )
        print(
            f"RSS: before {rss[0]:.1f} MiB, after burst 1 {rss[1]:.1f} MiB, after burst {bursts} {rss[-1]:.1f} MiB "
            f"(growth after warm-up {rss[-1] - rss[1]:+.1f} MiB)"
        )
    finally:
        print(f"server exit status {server.stop()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="schemathesis examples per operation and mode")
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--burst-size", type=int, default=200)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-soak-"))
    checkpoint = write_checkpoint(tmp / "tiny", "tiny", seed=0)
    settings_ = tiny_settings(checkpoint, max_body_bytes=4 * 1024 * 1024, log_level="error")
    with running(ServerThread(settings_)) as s:
        fuzz(s.url, args.examples)
        hostile(s.url)
    soak(checkpoint, tmp, args.bursts, args.burst_size)


if __name__ == "__main__":
    main()
