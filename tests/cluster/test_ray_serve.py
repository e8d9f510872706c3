"""farscope on a local Ray Serve cluster (loopback, CPU): a tiny model as a Serve deployment with two
replicas behind farscope's own gRPC ingress; many concurrent clients get results bit-identical to a
single-box solo run; a replica lost mid-run fails its jobs retryably while the other serves on; an
autoscaling deployment goes 1 -> 2 replicas under load and back to 1 when idle (Serve's status says).

Skipped where ray[serve] is not installed (`make test` installs it: the `cluster` extra).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import farscope  # noqa: E402
from farscope.interventions.errors import TransportError  # noqa: E402
from farscope.server.engine import StreamLimits  # noqa: E402
from farscope.server.ray_ingress import start_ingress  # noqa: E402
from farscope.server.ray_serve import INGRESS_APP, ServeOptions, deployment_for, ingress_app  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "When Mary and John went to the store"  # every client's prompt: equal lengths share passes
LAYER = "model.layers.1"
CLIENTS = 32


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A Ray cluster of two nodes on 127.0.0.1 (a head and a second node: each its own raylet and
    object store, 2 logical CPUs each on this 2-core machine) with Serve, and no HTTP proxy."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def deploy(spec: Any) -> None:
    serve.run(deployment_for(spec), name=spec.name, route_prefix=None)


def replica_count(app: str) -> int:
    status = serve.status().applications[app].deployments[app]
    return status.replica_states.get("RUNNING", 0)


def steering(index: int) -> torch.Tensor:
    return torch.randn(64, generator=torch.Generator().manual_seed(index))


def traced(model: farscope.RemoteModel, index: int) -> dict[str, torch.Tensor]:
    """Client `index`'s trace: its own steering vector added at layer 1, a read, the logits."""
    with model.trace(PROMPT):
        layer = model.model.layers[1]
        layer.output[:, -1] += steering(index)
        hidden = layer.output.save()
        logits = model.lm_head.output.save()
    return {"hidden": hidden.value, "logits": logits.value}


def generated(model: farscope.RemoteModel, *, close: bool = True) -> torch.Tensor:
    try:
        with model.generate(PROMPT, max_new_tokens=100) as tracer:
            tokens = tracer.result.save()
        return tokens.value
    finally:
        if close:
            model.close()


@pytest.fixture(scope="module")
def solo_box(tiny_model_dirs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The single box: `farscope serve` with the same tiny model, in a process of its own with one torch
    thread, as the replicas run (OMP_NUM_THREADS=1): with two, a batched matmul may split its work
    differently from a one-row one (tests/load/test_scheduling.py, `one_thread`). Its own process, so
    that no thread setting reaches the session's in-process servers. Yields its address."""
    config = tmp_path_factory.mktemp("solo") / "models.toml"
    config.write_text(f'[[models]]\nname = "tiny-llama"\nsource = "{tiny_model_dirs["llama"]}"\n')
    process = subprocess.Popen([sys.executable, "-m", "farscope.server.cli", "serve", "--config", str(config),
                                "--port", "0", "--no-auth"], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert process.stdout is not None
        line = ""
        while not line.startswith("farscope: serving"):
            line = process.stdout.readline()
            assert line, f"the single-box server exited early with {process.poll()}"
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def solo_runs(address: str, count: int) -> list[dict[str, torch.Tensor]]:
    """Each client's trace on the single box, one at a time: nothing shares a pass."""
    reference = farscope.RemoteModel("tiny-llama", address=address)
    try:
        return [traced(reference, index) for index in range(count)]
    finally:
        reference.close()


def concurrently(function: Callable[[int], Any], count: int) -> list[Any]:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(function, range(count)))


@pytest.fixture(scope="module")
def two_replicas(ray_cluster: None, tiny_spec: Callable[..., Any]) -> Iterator[farscope.RemoteModel]:
    spec = tiny_spec("llama", name="tiny-llama", serve={"replicas": 2, "num_cpus": 0.5})
    deploy(spec)
    ingress = start_ingress([spec.name], stream_limits=StreamLimits(max_execute_streams=CLIENTS))
    model = farscope.RemoteModel(spec.name, address=f"127.0.0.1:{ingress.port}")
    try:
        yield model
    finally:
        model.close()
        ingress.stop(grace=1.0)
        serve.delete(spec.name)


def test_serve_options_are_checked(tiny_spec: Callable[..., Any]) -> None:
    options = ServeOptions.of(tiny_spec("llama", serve={"min_replicas": 0, "max_replicas": 3, "num_gpus": 1}))
    assert options.deployment_options()["autoscaling_config"]["min_replicas"] == 0
    assert options.deployment_options()["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(ValueError, match="unknown key 'max_replica'"):
        ServeOptions.of(tiny_spec("llama", serve={"max_replica": 3}))
    with pytest.raises(ValueError, match="max_replicas"):
        ServeOptions.of(tiny_spec("llama", serve={"min_replicas": 2, "max_replicas": 1}))


def test_concurrent_clients_match_a_single_box_solo_run(two_replicas: farscope.RemoteModel,
                                                        solo_box: str) -> None:
    assert replica_count("tiny-llama") == 2
    # Where the replicas are (GCS's actor table: the state API would need the dashboard).
    actors = ray._private.state.actors().values()
    nodes = {actor["Address"]["NodeID"] for actor in actors
             if actor["State"] == "ALIVE" and actor["ActorClassName"] == "ServeReplica:tiny-llama:tiny-llama"}
    assert len(nodes) == 2, "Serve spreads a deployment's replicas over the nodes"
    solo = solo_runs(solo_box, CLIENTS)
    started = time.perf_counter()
    clustered = concurrently(lambda index: traced(two_replicas, index), CLIENTS)
    seconds = time.perf_counter() - started
    for index, (got, want) in enumerate(zip(clustered, solo, strict=True)):
        for name in want:
            assert torch.equal(got[name], want[name]), f"client {index}: {name} differs from the solo run"
    print(f"\n{CLIENTS} concurrent clients through the ingress, 2 replicas: {seconds:.2f} s")


def test_the_ingress_runs_as_a_serve_application_too(two_replicas: farscope.RemoteModel, solo_box: str,
                                                    tiny_model_dirs: dict[str, Any], tmp_path: Any) -> None:
    # As deploy/ray/serve.yaml runs it: ingress_app reads the models file and serves each model's app.
    models_file = tmp_path / "models.toml"
    models_file.write_text(f'[[models]]\nname = "tiny-llama"\nsource = "{tiny_model_dirs["llama"]}"\n')
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.run(ingress_app({"models_file": str(models_file), "host": "127.0.0.1", "port": port,
                           "num_cpus": 0.25, "no_auth": True}), name=INGRESS_APP, route_prefix=None)
    model = farscope.RemoteModel("tiny-llama", address=f"127.0.0.1:{port}")
    try:
        want = solo_runs(solo_box, 2)
        for index in range(2):
            got = traced(model, index)
            assert all(torch.equal(got[name], want[index][name]) for name in want[index])
    finally:
        model.close()
        serve.delete(INGRESS_APP)


def test_a_lost_replica_fails_its_jobs_retryably_and_the_other_serves_on(two_replicas: farscope.RemoteModel,
                                                                          solo_box: str) -> None:
    # Generation (100 forward passes a job), so that both replicas have jobs running when one is killed.
    want = generated(farscope.RemoteModel("tiny-llama", address=solo_box))
    stop = threading.Event()
    outcomes: list[tuple[float, Any]] = []  # (when, logits or the error), from 4 clients in a loop

    def client(index: int) -> None:
        while not stop.is_set():
            try:
                got: Any = generated(two_replicas, close=False)
                assert torch.equal(got, want)
            except TransportError as e:
                got = e
            outcomes.append((time.perf_counter(), got))

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(client, index) for index in range(4)]
        time.sleep(1.0)
        replicas = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
                    if "tiny-llama" in actor["name"] and "REPLICA" in actor["name"].upper()]
        assert len(replicas) == 2, replicas
        killed_at = time.perf_counter()
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        time.sleep(2.0)
        stop.set()
        for future in futures:
            future.result(timeout=60)
    lost = [o for _, o in outcomes if isinstance(o, TransportError)]
    assert lost, "no job was in flight on the killed replica"
    assert all("retry" in str(e) for e in lost)
    served_after = [o for when, o in outcomes if when > killed_at + 0.5 and isinstance(o, torch.Tensor)]
    assert served_after, "nothing was served after the replica was lost"
    deadline = time.monotonic() + 90
    while replica_count("tiny-llama") < 2:  # Serve replaces the lost replica
        assert time.monotonic() < deadline, "the deployment did not recover its second replica"
        time.sleep(0.5)
    print(f"\nlost replica: {len(lost)} jobs failed retryably, {len(served_after)} served after it; 2 replicas "
          f"again {time.perf_counter() - killed_at:.1f} s after the kill")


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_autoscaling_goes_up_under_load_and_down_when_idle(ray_cluster: None,
                                                           tiny_spec: Callable[..., Any]) -> None:
    spec = tiny_spec("llama", name="tiny-auto", serve={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "max_ongoing_requests": 4,
        "upscale_delay_s": 0.5, "downscale_delay_s": 3, "look_back_period_s": 2, "metrics_interval_s": 0.5,
        "num_cpus": 0.5})
    deploy(spec)
    ingress = start_ingress([spec.name], stream_limits=StreamLimits(max_execute_streams=CLIENTS))
    model = farscope.RemoteModel(spec.name, address=f"127.0.0.1:{ingress.port}")
    stop = threading.Event()
    try:
        assert replica_count(spec.name) == 1

        def load(index: int) -> None:
            while not stop.is_set():
                traced(model, index)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=6) as pool:
            for index in range(6):
                pool.submit(load, index)
            deadline = time.monotonic() + 60
            while replica_count(spec.name) < 2:
                assert time.monotonic() < deadline, "no second replica under load"
                time.sleep(0.2)
            up = time.perf_counter() - started
            stop.set()
        idle = time.perf_counter()
        deadline = time.monotonic() + 60
        while replica_count(spec.name) > 1:
            assert time.monotonic() < deadline, "the idle deployment kept two replicas"
            time.sleep(0.2)
        down = time.perf_counter() - idle
        print(f"\nautoscaling: 1 -> 2 replicas {up:.1f} s after load began, 2 -> 1 {down:.1f} s after it ended")
    finally:
        stop.set()
        model.close()
        ingress.stop(grace=1.0)
        serve.delete(spec.name)



@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_scaled_to_zero_the_first_request_waits_for_a_replica_and_says_so(
        ray_cluster: None, tiny_spec: Callable[..., Any], solo_box: str) -> None:
    spec = tiny_spec("llama", name="tiny-zero", serve={
        "min_replicas": 0, "max_replicas": 1, "downscale_delay_s": 1, "look_back_period_s": 2,
        "metrics_interval_s": 0.5, "num_cpus": 0.5})
    deploy(spec)
    ingress = start_ingress([spec.name])  # asks a replica for the model's description: one starts
    lines: list[str] = []
    model = farscope.RemoteModel(spec.name, address=f"127.0.0.1:{ingress.port}", on_log=lines.append)
    try:
        deadline = time.monotonic() + 60
        while replica_count(spec.name) > 0:
            assert time.monotonic() < deadline, "the idle deployment did not scale to zero"
            time.sleep(0.2)
        started = time.perf_counter()
        got = traced(model, 0)
        cold = time.perf_counter() - started
        want = solo_runs(solo_box, 1)[0]
        assert all(torch.equal(got[name], want[name]) for name in want)
        assert any("waiting for a replica of model tiny-zero" in line for line in lines), lines
        print(f"\nfrom zero replicas: the first request took {cold:.1f} s")
    finally:
        model.close()
        ingress.stop(grace=1.0)
        serve.delete(spec.name)
