"""Operator metrics in Prometheus' format: queue depth, job latency, bytes in/out, errors by code,
whether each model's worker is up.

Each server has its own registry (several servers in one process, as in tests, never clash);
`serve_http(port)` exposes it, with the process collector's memory and CPU figures.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.process_collector import ProcessCollector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, ...
        self.requests = Counter("farscope_requests", "Requests received, by RPC", ["rpc"], registry=self.registry)
        self.errors = Counter("farscope_errors", "Requests ended with an error, by gRPC status code",
                              ["code"], registry=self.registry)
        self.jobs = Counter("farscope_jobs", "Jobs finished, by model and outcome", ["model", "outcome"],
                            registry=self.registry)
        self.latency = Histogram("farscope_job_seconds", "Time from submission to the end of a job",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.run_time = Histogram("farscope_job_run_seconds", "Time a job ran on its replica", ["model"],
                                  buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.bytes_in = Counter("farscope_bytes_in", "Request graph bytes received", registry=self.registry)
        self.bytes_out = Counter("farscope_bytes_out", "Result bytes sent", registry=self.registry)
        self.queue_depth = Gauge("farscope_queue_depth", "Jobs waiting, by model", ["model"],
                                 registry=self.registry)
        self.worker_up = Gauge("farscope_worker_up", "1 while the model's worker thread is up, else 0",
                               ["model"], registry=self.registry)

    def record_job(self, model: str, outcome: str, seconds: float, run_seconds: float | None) -> None:
        """One finished job: its outcome ("done" or the error's class), its time from submission to the
        end, and its time on the replica (None when it never ran to the end)."""
        self.jobs.labels(model=model, outcome=outcome).inc()
        self.latency.labels(model=model).observe(seconds)
        if run_seconds is not None:
            self.run_time.labels(model=model).observe(run_seconds)

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model=model).set_function(depth)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics on host:port (0 picks a free port); returns the port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
