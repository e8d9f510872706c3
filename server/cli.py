"""The `farscope` console script: `farscope serve` serves models over gRPC; `farscope keys` manages API keys."""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .jobs import DEFAULT_JOB_TTL
from .logs import configure

if TYPE_CHECKING:
    from .auth import KeyStore

__all__ = ["main"]

_STREAM_LIMITS = ("max_execute_streams", "max_watch_streams", "max_unauthenticated", "message_seconds",
                  "request_seconds")
_DB_HELP = "API key database (default: $FARSCOPE_DB, else ~/.local/share/farscope/keys.db)"


def _serve(args: argparse.Namespace) -> int:
    # Heavy imports here, so `farscope --help` stays fast.
    from .config import DEFAULT_MODEL, load_models_file
    from .engine import DEFAULT_UPLOAD_BYTES, StreamLimits
    from .loading import load_model
    from .replica import Replica
    from .service import start_server

    specs = load_models_file(args.config) if args.config else [DEFAULT_MODEL]
    if args.model:
        specs = [s for s in specs if s.name == args.model]
        if not specs:
            print(f"farscope: no model named {args.model!r} is configured", file=sys.stderr)
            return 2
    log = logging.getLogger("farscope")
    # 127.0.0.1 unless --host is given: only this machine can connect, the one guard left with --no-auth.
    host = args.host or "127.0.0.1"
    if args.no_auth:
        keys = None
        log.warning("authentication is off (--no-auth): anyone who can reach %s may use every model", host)
    else:
        try:
            keys = _open_keys(args.db)
        except (OSError, sqlite3.Error, RuntimeError) as e:
            print(f"farscope: cannot open the key database: {e}", file=sys.stderr)
            return 2
        if all(info.revoked for info in keys.list()):
            log.warning("no API keys in %s yet: add one with `farscope keys add NAME --db %s`", keys.path, keys.path)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            print("farscope: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes())
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    given = {name: getattr(args, name) for name in _STREAM_LIMITS if getattr(args, name) is not None}
    try:
        limits = StreamLimits(**given)  # the defaults for what is not given
    except ValueError as e:
        print(f"farscope: {e}", file=sys.stderr)
        return 2
    # Bind first (health says NOT_SERVING), load, then report SERVING.
    server = start_server({}, host=host, port=args.port, serving=False, keys=keys, tls=tls,
                          metrics_port=args.metrics_port, job_ttl=args.job_ttl, cobatch=not args.no_cobatch,
                          stream_limits=limits, upload_bytes=args.upload_bytes or DEFAULT_UPLOAD_BYTES,
                          upload_bytes_per_user=args.upload_bytes_per_user)
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", host, server.metrics_port)
    log.info("listening on %s:%d; loading %s", host, server.port, ", ".join(s.name for s in specs))
    try:
        for spec in specs:
            server.add(Replica(load_model(spec)))
    except BaseException:
        server.stop(grace=0)
        if keys is not None:
            keys.close()
        raise
    server.set_serving()
    # One parseable line: harnesses (make demo, tests) read the port from it.
    print(f"farscope: serving {', '.join(s.name for s in specs)} on {host}:{server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("draining: no new jobs; running jobs get %g s", args.grace)
    server.stop(grace=args.grace)
    if keys is not None:
        keys.close()
    return 0


def _open_keys(db: str | None) -> KeyStore:
    from .auth import KeyStore

    return KeyStore(db if db else KeyStore.default_path())


def _keys(args: argparse.Namespace) -> int:
    try:
        keys = _open_keys(args.db)
    except (OSError, sqlite3.Error, RuntimeError) as e:
        print(f"farscope: cannot open the key database: {e}", file=sys.stderr)
        return 1
    with keys:
        if args.keys_command == "add":
            return _add_key(keys, args)
        if args.keys_command == "revoke":
            if keys.revoke(args.name):
                print(f"farscope: revoked the key of {args.name!r}", file=sys.stderr)
                return 0
            print(f"farscope: no active key named {args.name!r} in {keys.path}", file=sys.stderr)
            return 1
        infos = keys.list()
    if not infos:
        print(f"farscope: no API keys in {keys.path}", file=sys.stderr)
        return 0
    rows = [("NAME", "PREFIX", "MODELS", "RATE/MIN", "CONCURRENT", "CREATED", "REVOKED")]
    rows += [
        (
            info.name,
            info.prefix + "...",
            "*" if info.models is None else ",".join(sorted(info.models)),
            str(info.rate_per_minute),
            str(info.max_concurrent),
            f"{info.created_at:%Y-%m-%d %H:%M:%S}Z",
            f"{info.revoked_at:%Y-%m-%d %H:%M:%S}Z" if info.revoked_at else "-",
        )
        for info in infos
    ]
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _add_key(keys: KeyStore, args: argparse.Namespace) -> int:
    models = None if args.models is None else [m for m in args.models.split(",") if m.strip()]
    try:
        key = keys.add(args.name, models=models, rate_per_minute=args.rate, max_concurrent=args.concurrent)
    except (ValueError, TypeError) as e:
        print(f"farscope: {e}", file=sys.stderr)
        return 1
    # The key alone on stdout (so `KEY=$(farscope keys add NAME)` works); the notice on stderr.
    print(key, flush=True)
    print(f"farscope: the API key of {args.name!r} is above; it will not be shown again, store it now",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farscope", description="farscope: remote interpretability")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over gRPC")
    serve.add_argument("--model", help="serve only this model from the config (default: all)")
    serve.add_argument("--config", help="models file (TOML); default: the embedded smollm2-135m")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="json: one object a line, with job ids (default text)")
    serve.add_argument("--metrics-port", type=int, default=None, metavar="N",
                       help="serve Prometheus metrics on this port (0 picks a free one; default off)")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="... and this private key")
    serve.add_argument("--job-ttl", type=float, default=DEFAULT_JOB_TTL, metavar="S",
                       help=f"keep finished jobs' results this long for fetching by id (default {DEFAULT_JOB_TTL:g})")
    serve.add_argument("--grace", type=float, default=30.0, metavar="S",
                       help="on SIGTERM, let running jobs finish this long before cancelling (default 30)")
    serve.add_argument("--torch-threads", type=int, default=None, metavar="N",
                       help="torch intra-op threads on CPU (default: torch's). On small CPU boxes 1 is often "
                            "much faster: the request decoding threads need the cores too")
    serve.add_argument("--no-cobatch", action="store_true",
                       help="run every request in its own forward pass (default: share compatible ones)")
    limits = serve.add_argument_group("limits on calls (per API key, or for the one user with --no-auth)")
    # Defaults as engine.StreamLimits has them (not imported here: it would load torch for --help).
    limits.add_argument("--max-execute-streams", type=int, metavar="N",
                        help="Execute/Submit calls a key may have open at once (default 16; never below "
                             "the key's concurrent jobs)")
    limits.add_argument("--max-watch-streams", type=int, metavar="N",
                        help="Watch calls a key may have open at once (default 64; never below the key's "
                             "concurrent jobs)")
    limits.add_argument("--max-unauthenticated", type=int, metavar="N",
                        help="calls of all users together waiting for their key to be checked (default 64)")
    limits.add_argument("--message-seconds", type=float, metavar="S",
                        help="a request's header, and each chunk after it, must arrive within S seconds "
                             "(default 30); else the call ends DEADLINE_EXCEEDED")
    limits.add_argument("--request-seconds", type=float, metavar="S",
                        help="a whole request must arrive within S seconds (default 300)")
    limits.add_argument("--upload-bytes", type=int, metavar="N",
                        help="uploaded tensors kept, all users together (default 1073741824: 1 GiB)")
    limits.add_argument("--upload-bytes-per-user", type=int, default=None, metavar="N",
                        help="uploaded tensors kept per user (default: --upload-bytes); each user sees only "
                             "their own uploads")
    serve.add_argument("--db", metavar="PATH", help=_DB_HELP)
    serve.add_argument("--no-auth", action="store_true",
                       help="accept calls without an API key (binds 127.0.0.1 unless --host is given)")
    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="PATH", help=_DB_HELP)
    add = keys.add_parser("add", parents=[db], help="create a key and print it (once)")
    add.add_argument("name", help="who the key is for (unique)")
    add.add_argument("--models", metavar="A,B", help="comma-separated models it may use (default: all)")
    add.add_argument("--rate", type=int, default=120, metavar="N", help="requests per minute (default 120)")
    add.add_argument("--concurrent", type=int, default=4, metavar="N", help="jobs at once (default 4)")
    keys.add_parser("list", parents=[db], help="list keys (never the keys themselves)")
    revoke = keys.add_parser("revoke", parents=[db], help="revoke a key at once")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    configure(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        return _keys(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
