"""The `farscope` console script: `farscope serve` serves models over gRPC."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

__all__ = ["main"]


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
    # Bind first (health says NOT_SERVING), load, then report SERVING.
    server = start_server({}, host=args.host, port=args.port, serving=False)
    log = logging.getLogger("farscope")
    log.info("listening on %s:%d; loading %s", args.host, server.port, ", ".join(s.name for s in specs))
    try:
        for spec in specs:
            server.add(Replica(load_model(spec)))
    except BaseException:
        server.stop(grace=0)
        raise
    server.set_serving()
    # One parseable line: harnesses (make demo, tests) read the port from it.
    print(f"farscope: serving {', '.join(s.name for s in specs)} on {args.host}:{server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=10)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farscope", description="farscope: remote interpretability")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve models over gRPC")
    serve.add_argument("--model", help="serve only this model from the config (default: all)")
    serve.add_argument("--config", help="models file (TOML); default: the embedded smollm2-135m")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    serve.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return _serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
