"""The `farscope` console script: `farscope serve` serves models over gRPC; `farscope keys` manages API keys."""

from __future__ import annotations

import argparse
import inspect
import logging
import signal
import sqlite3
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .auth import KeyStore

__all__ = ["main"]

_DB_HELP = "API key database (default: $FARSCOPE_DB, else ~/.local/share/farscope/keys.db)"


def _serve(args: argparse.Namespace) -> int:
    # Heavy imports here, so `farscope --help` stays fast.
    from .config import DEFAULT_MODEL, load_models_file
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
    # service.start_server enforces keys once it takes a `keys` parameter; until then it gets none.
    extra: dict[str, KeyStore | None] = {}
    if "keys" in inspect.signature(start_server).parameters:
        extra["keys"] = keys
    elif keys is not None:
        log.warning("this server build does not check API keys yet: every caller is allowed")
    # Bind first (health says NOT_SERVING), load, then report SERVING.
    server = start_server({}, host=host, port=args.port, serving=False, **extra)
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
    server.stop(grace=10)
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
    logging.basicConfig(level=getattr(args, "log_level", "WARNING").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args)
    if args.command == "keys":
        return _keys(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
