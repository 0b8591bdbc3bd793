"""`rankserve serve` (the HTTP server), `rankserve score` (rank passages from the command line) and `rankserve eval`
(measure a server on a BEIR-format dataset)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from rankserve.errors import RankserveError
from rankserve.logs import setup_logging
from rankserve.ranker import RankRequest, Truncate
from rankserve.settings import Settings

log = logging.getLogger("rankserve")


def _settings_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per settings field; unset flags leave the environment (or the default) in force."""
    for name, field in Settings.model_fields.items():
        if name in skip:
            continue
        env = [a for a in getattr(field.validation_alias, "choices", []) if a.isupper()]
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or ''} [env: {', '.join(env)}; default: {default!r}]"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar="VALUE", help=help_text)


def _preset(path: str | None) -> dict[str, Any]:
    """Settings from a YAML preset (configs/*.yaml). They rank below the environment and the flags."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"rankserve: cannot read the preset {path}: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"rankserve: the preset {path} must be a mapping of setting: value")
    data.pop("build", None)  # the TensorRT build profile (configs/<gpu>.yaml): read by `rankserve build-engine`
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise SystemExit(f"rankserve: the preset {path} has unknown settings: {', '.join(unknown)}")
    env = {k.upper() for k in os.environ}
    preset = {}
    for name, value in data.items():
        aliases = getattr(Settings.model_fields[name].validation_alias, "choices", [])
        if not any(a.upper() in env for a in aliases if a.isupper()):
            preset[name] = value
    return preset


def _build_settings(args: argparse.Namespace) -> Settings:
    flags = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**{**_preset(getattr(args, "config", None)), **flags})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise SystemExit(f"rankserve: invalid settings: {problems}") from None


def serve(args: argparse.Namespace) -> int:
    from rankserve.api.app import create_app
    from rankserve.model.checkpoint import open_checkpoint

    settings = _build_settings(args)
    setup_logging(settings.log_level, settings.log_format)
    server: DrainingServer | None = None

    def on_fatal(message: str) -> None:
        if server is not None:
            server.fatal = True
            server.should_exit = True

    try:
        # Fail fast (before binding the port) on a missing, unreachable or wrong checkpoint, or on tracing
        # configured without the `otel` extra.
        checkpoint = open_checkpoint(settings.model)
        app = create_app(settings, checkpoint=checkpoint, on_fatal=on_fatal)
    except RankserveError as e:
        print(f"rankserve: {e.message}", file=sys.stderr)
        return 2
    # Our logging setup formats uvicorn's lines too (log_config=None); the access line is ours (one per request,
    # with the request id, counts and times), so uvicorn's own is off.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=None,
    )
    server = DrainingServer(config, app.state.rs, settings.shutdown_drain_seconds)
    server.run()
    return 1 if server.fatal else 0


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: readiness 503 and new work refused at once; the listener closes after
    `drain_seconds` (so a load balancer notices first) and in-flight requests finish. A second signal exits now."""

    def __init__(self, config: uvicorn.Config, state: Any, drain_seconds: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_seconds = drain_seconds
        self.fatal = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        first = not self.state.draining
        self.state.draining = True
        if not first:  # a second signal: stop waiting for in-flight requests
            self.force_exit = True
        if not first or self.drain_seconds <= 0:
            self._stop(sig, frame)
            return
        log.info("draining for %.1fs before shutdown", self.drain_seconds)
        timer = threading.Timer(self.drain_seconds, self._stop, args=(sig, None))
        timer.daemon = True
        timer.start()

    def _stop(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises a handled signal once it has shut down (exit status 128+N); a graceful shutdown
        # is a clean exit: status 0.
        self._captured_signals.clear()


def score(args: argparse.Namespace) -> int:
    from rankserve.runtime import Runtime

    settings = _build_settings(args)
    # An interactive command: plain text unless a format is asked for.
    log_format = "text" if settings.log_format == "auto" else settings.log_format
    setup_logging("warning" if args.log_level is None else settings.log_level, log_format)
    try:
        runtime = Runtime.load(settings.model_copy(update={"warmup": False}))
    except RankserveError as e:
        print(f"rankserve: {e.message}", file=sys.stderr)
        return 2
    request = RankRequest(query=args.query, passages=args.passage, truncate=Truncate(args.truncate))

    async def run() -> Any:
        runtime.scheduler.start()
        try:
            return await runtime.ranker.rank(request)
        finally:
            await runtime.scheduler.close()

    try:
        result = asyncio.run(run())
    except RankserveError as e:
        print(f"rankserve: {e.message}", file=sys.stderr)
        return 2
    if args.json:
        rankings = [{"index": r.index, "logit": r.logit} for r in result.rankings]
        print(json.dumps({"rankings": rankings, "usage": {"prompt_tokens": result.prompt_tokens}}))
        return 0
    if runtime.checkpoint.config.random_weights:
        print("note: this checkpoint holds random test weights; the scores are meaningless", file=sys.stderr)
    print(f"{'rank':>4}  {'index':>5}  {'logit':>10}  passage")
    for rank, r in enumerate(result.rankings, 1):
        text = args.passage[r.index].replace("\n", " ")
        print(f"{rank:>4}  {r.index:>5}  {r.logit:>10.4f}  {text[:70] + ('…' if len(text) > 70 else '')}")
    print(f"({result.prompt_tokens} tokens)")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rankserve", description="NIM-compatible reranking service")
    sub = parser.add_subparsers(dest="command", required=True)

    p_serve = sub.add_parser("serve", help="serve the HTTP API (NIM /v1/ranking)")
    p_serve.add_argument("--config", help="YAML preset of settings (configs/*.yaml); env and flags override it")
    _settings_flags(p_serve)
    p_serve.set_defaults(func=serve)

    p_score = sub.add_parser("score", help="rank passages for a query and print the ranking")
    p_score.add_argument("--query", required=True)
    p_score.add_argument("--passage", action="append", required=True, help="repeat for each passage")
    p_score.add_argument("--truncate", choices=[t.value for t in Truncate], default="NONE")
    p_score.add_argument("--json", action="store_true", help="print the ranking as JSON")
    server_only = ("host", "port", "api_key", "auth_public_routes", "shutdown_drain_seconds")
    _settings_flags(p_score, skip=(*server_only, "access_log", "log_request_text", "otlp_endpoint"))
    p_score.set_defaults(func=score)

    from rankserve.eval import command as eval_command  # stdlib only; the eval deps load when it runs

    p_eval = sub.add_parser("eval", help="measure a reranking server on a BEIR-format dataset (docs/evaluation.md)")
    eval_command.add_arguments(p_eval)
    p_eval.set_defaults(func=eval_command.run)

    from rankserve.tensorrt import command as build_engine_command  # stdlib only; TensorRT loads when it runs

    p_build = sub.add_parser("build-engine", help="build a TensorRT engine for this GPU (docs/tensorrt.md)")
    build_engine_command.add_arguments(p_build)
    p_build.set_defaults(func=build_engine_command.run)

    from rankserve.export import command as export_command  # stdlib only; torch and onnx load when it runs

    p_export = sub.add_parser("export", help="export the model to another format (docs/onnx.md)")
    export_command.add_arguments(p_export)

    args = parser.parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":  # `python -m rankserve.cli`
    main()
