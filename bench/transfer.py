"""How fast tensors cross the wire: farscope downloads and uploads next to raw loopback TCP, in one run.

Run by hand: ``.venv/bin/python bench/transfer.py [--mib 256] [--repeat 5]``. Measured side by side:

- raw TCP: one loopback socket moving the same number of bytes from one buffer into another
  (``sendall`` of a memoryview, ``recv_into`` a fresh buffer): the ceiling on this machine;
- farscope with the server in its own process (``farscope serve --no-auth --port 0``, as users run
  it, serving the default model), and, beside it, with the server in this process:
  - download: a saved tensor of about ``--mib`` MiB made on the server (the logits, repeated); MB/s
    over the time from the result header to the last byte in place ("stream"), and end to end (from
    the request to the values in the client's tensor, less the server's run time);
  - time to first byte: from the request to the first result chunk, less the server's run time;
  - upload: a fresh tensor of ``--mib`` MiB sent with the request, of which one element is saved;
    end to end less the server's run time, so it includes hashing it on both sides (a large tensor is
    sent once, then by digest: uploads.py) and the server keeping its copy.

Each figure is the median of ``--repeat`` rounds after one warm-up round. MB is 10**6 bytes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PROMPT = "Hi"
HERE = Path(__file__).resolve().parent


# -- raw loopback TCP ------------------------------------------------------------------------------


def raw_tcp_seconds(nbytes: int) -> float:
    """Seconds to move `nbytes` from one buffer to another over one loopback TCP connection."""
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def send() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    with socket.create_connection(("127.0.0.1", port)) as client:
        start = time.perf_counter()
        # A fresh, unzeroed buffer, as farscope's client receives into (its pages are faulted in by the data).
        view = memoryview(torch.empty(payload.nbytes, dtype=torch.uint8).numpy()).cast("B")
        got = 0
        while got < len(view):
            n = client.recv_into(view[got:])
            if not n:
                raise ConnectionError("sender closed early")
            got += n
        seconds = time.perf_counter() - start
    sender.join()
    listener.close()
    return seconds


# -- farscope --------------------------------------------------------------------------------------


class Timed:
    """Wraps a RemoteModel's transport so each call records when the result header and the last
    chunk arrived, and the server's run time."""

    def __init__(self, model: Any) -> None:
        self.transport = model._transport
        self.plain_execute = self.transport.execute
        self.marks: dict[str, float] = {}
        self.transport.execute = self.execute

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.marks = {"sent": time.perf_counter()}

        def on_event(event: Any) -> None:
            kind = event.WhichOneof("event")
            now = time.perf_counter()
            if kind == "result":
                self.marks["header"] = now
            elif kind == "chunk":
                self.marks.setdefault("first_chunk", now)
                self.marks["last_chunk"] = now
            elif kind == "done":
                self.marks["run"] = event.done.run_seconds

        result = self.plain_execute(*args, on_event=on_event, **kwargs)
        self.marks["filled"] = time.perf_counter()
        return result


def _layer0(model: Any) -> Any:
    return model.model.layers[0].output


def download_round(model: Any, timed: Timed, nbytes: int) -> dict[str, float]:
    """Saves the logits repeated into a tensor of about `nbytes` (made on the server, as a cache of
    activations is): nothing large travels up, and the repeat is part of the server's run time."""
    with model.trace(PROMPT):
        one = model.lm_head.output.save()
    copies = max(1, nbytes // one.value.nbytes)
    with model.trace(PROMPT):
        logits = model.lm_head.output
        big = logits.repeat(copies, 1, 1).save()
    marks = timed.marks
    if not (torch.equal(big.value[0], one.value[0]) and torch.equal(big.value[-1], one.value[0])):
        raise AssertionError("download returned wrong values")
    return {
        "bytes": big.value.nbytes,
        "stream_s": marks["filled"] - marks["header"],
        "total_s": marks["filled"] - marks["sent"] - marks["run"],
        "ttfb_s": marks["first_chunk"] - marks["sent"] - marks["run"],
    }


def upload_round(model: Any, timed: Timed, nbytes: int, seed: int) -> dict[str, float]:
    vec = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(seed))  # new each round: no digest hit
    with model.trace(PROMPT):
        index = (_layer0(model)[0, 0, :1] * 0).long() + 7
        picked = torch.index_select(vec, 0, index).save()
    if picked.value.reshape(-1)[0].item() != vec[7].item():
        raise AssertionError("upload arrived with wrong values")
    marks = timed.marks
    return {"total_s": marks["filled"] - marks["sent"] - marks["run"]}


def measure(model: Any, nbytes: int, repeat: int) -> dict[str, float]:
    timed = Timed(model)
    downloads = [download_round(model, timed, nbytes) for _ in range(repeat + 1)][1:]
    uploads = [upload_round(model, timed, nbytes, seed) for seed in range(1, repeat + 2)][1:]
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    return {
        "download_MBps": med(downloads, "bytes") / med(downloads, "stream_s") / 1e6,
        "download_end_to_end_MBps": med(downloads, "bytes") / med(downloads, "total_s") / 1e6,
        "ttfb_ms": med(downloads, "ttfb_s") * 1e3,
        "upload_MBps": nbytes / med(uploads, "total_s") / 1e6,
    }


@contextmanager
def own_process_server() -> Iterator[str]:
    """`farscope serve --no-auth --port 0` in a subprocess; yields its address."""
    script = Path(sys.executable).parent / "farscope"
    args = [str(script) if script.exists() else "farscope", "serve", "--no-auth", "--port", "0"]
    env = {**os.environ, "FARSCOPE_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("farscope: serving"):
                yield line.rsplit(" ", 1)[1].strip()
                return
        raise RuntimeError("`farscope serve` exited before serving")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def in_process_server() -> Iterator[str]:
    from farscope.server.config import DEFAULT_MODEL
    from farscope.server.loading import load_model
    from farscope.server.replica import Replica
    from farscope.server.service import start_server

    loaded = load_model(DEFAULT_MODEL)
    server = start_server({loaded.spec.name: Replica(loaded)}, port=0)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace=0)


def run(where: str, server: Callable[[], Any], nbytes: int, repeat: int) -> dict[str, float]:
    import farscope

    with server() as address:
        model = farscope.RemoteModel("smollm2-135m", address=address, timeout=300)
        return measure(model, nbytes, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=255,
                        help="tensor size in MiB (default 255: a request may be at most 256 MiB by default)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process server")
    args = parser.parse_args()
    torch.set_num_threads(1)
    nbytes = args.mib << 20
    raw = nbytes / statistics.median(raw_tcp_seconds(nbytes) for _ in range(args.repeat)) / 1e6
    rows = {"own process": run("own process", own_process_server, nbytes, args.repeat)}
    if not args.no_in_process:
        rows["in process"] = run("in process", in_process_server, nbytes, args.repeat)
    print(f"tensor: {args.mib} MiB float32; median of {args.repeat} rounds; MB = 10**6 bytes")
    print(f"raw loopback TCP: {raw:,.0f} MB/s")
    print(f"{'server':<12} {'download MB/s':>14} {'% of TCP':>9} {'end to end':>11} {'TTFB ms':>8} "
          f"{'upload MB/s':>12} {'% of TCP':>9}")
    for name, row in rows.items():
        print(f"{name:<12} {row['download_MBps']:>14,.0f} {100 * row['download_MBps'] / raw:>8.0f}% "
              f"{row['download_end_to_end_MBps']:>11,.0f} {row['ttfb_ms']:>8.1f} {row['upload_MBps']:>12,.0f} "
              f"{100 * row['upload_MBps'] / raw:>8.0f}%")


if __name__ == "__main__":
    main()
