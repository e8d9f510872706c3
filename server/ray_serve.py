"""farscope on Ray Serve: one Serve application per model, and the gRPC ingress as one more.

Each model is a Serve deployment (`ModelReplica`) whose replicas each load the model through the same
code as a single box (loading.load_model, Replica) and run jobs with the same engine (engine.Engine:
its scheduler keeps per-user fairness and co-batching inside the replica). The deployment's options
come from the models file's ``[models.serve]`` table::

    [models.serve]
    min_replicas = 1              # 0 allowed: the first request waits while a replica starts
    max_replicas = 4
    initial_replicas = 1
    target_ongoing_requests = 4   # jobs in flight per replica that Serve scales to keep
    upscale_delay_s = 10
    downscale_delay_s = 60
    look_back_period_s = 30       # the window of load Serve averages
    metrics_interval_s = 10       # how often replicas and handles report load (< look_back_period_s)
    max_ongoing_requests = 16     # jobs one replica takes at once (its scheduler queues them)
    num_gpus = 1                  # per replica; accelerate's device_map spreads the model over them
    num_cpus = 1
    # or, without autoscaling: replicas = 2

Why an ingress of our own rather than Serve's gRPC proxy (deploy/README.md): Serve's proxy (2.60)
does route client-streaming calls, but it pulls each request message from the replica back through
an actor call to the proxy, answers only its own health service, and leaves farscope's per-key stream
caps, message deadlines and error metadata (``farscope-error``, ``retry-after``) to be rebuilt on its
`RayServegRPCContext`. farscope's own grpc.aio front (service.py) already does all of that; it runs
unchanged as a stateless ingress (`FarscopeIngress`, any number of copies: gRPC binds with
SO_REUSEPORT) whose engine sends each validated job to its model's deployment through a deployment
handle (ray_ingress.py).

`build_app(args)` / `model_app(args)` / `ingress_app(args)` are Serve application builders
(deploy/ray/serve.yaml). Importing this module needs ``ray[serve]`` (``pip install farscope[cluster]``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from farscope.interventions.errors import FarscopeError

from .config import ModelSpec, load_models_file
from .engine import Engine, StreamLimits
from .jobs import Event, Job
from .replica import Replica

__all__ = ["INGRESS_APP", "FarscopeIngress", "Finished", "ModelInfo", "ModelReplica", "ServeOptions",
           "build_app", "deployment_for", "ingress_app", "model_app", "model_specs"]

log = logging.getLogger(__name__)

INGRESS_APP = "farscope-ingress"
DEFAULT_PORT = 50051
# A replica keeps a job only until its outcome is relayed; the ingress keeps it for the clients.
REPLICA_JOB_TTL = 60.0


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """A model's ``[models.serve]`` table: its Serve deployment options (module docstring)."""

    replicas: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0
    max_ongoing_requests: int = 16
    num_gpus: float = 0.0
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        for name in ("min_replicas", "max_replicas", "max_ongoing_requests"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"serve.{name} must be a whole number >= 0, got {value!r}")
        for name in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s",
                     "look_back_period_s", "metrics_interval_s", "num_gpus", "num_cpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"serve.{name} must be a number >= 0, got {value!r}")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"serve.max_replicas ({self.max_replicas}) must be >= 1 and >= min_replicas "
                             f"({self.min_replicas})")
        if self.replicas is not None and (isinstance(self.replicas, bool) or not isinstance(self.replicas, int)
                                          or self.replicas < 1):
            raise ValueError(f"serve.replicas must be a whole number >= 1, got {self.replicas!r}")
        if self.max_ongoing_requests < 1 or self.target_ongoing_requests <= 0:
            raise ValueError("serve.max_ongoing_requests and serve.target_ongoing_requests must be > 0")

    @classmethod
    def of(cls, spec: ModelSpec) -> ServeOptions:
        table = dict(spec.serve or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"model {spec.name!r}: unknown key {unknown[0]!r} in [models.serve]; known keys: "
                             f"{', '.join(sorted(known))}")
        try:
            return cls(**table)
        except ValueError as e:
            raise ValueError(f"model {spec.name!r}: {e}") from None

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options`."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.replicas is not None:
            options["num_replicas"] = self.replicas
        else:
            autoscaling = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s,
                # Deprecated by Ray for environment variables that 2.60 does not read yet: still the knob.
                "metrics_interval_s": self.metrics_interval_s,
            }
            if self.initial_replicas is not None:
                autoscaling["initial_replicas"] = self.initial_replicas
            options["autoscaling_config"] = autoscaling
        return options


@dataclass(frozen=True)
class ModelInfo:
    """What an ingress needs of a model without holding it: names and limits to validate requests,
    and what DescribeModel / GetTokenizer answer. Stands in for a Replica in the ingress's engine."""

    name: str
    limits: Any  # config.Limits
    modules: list[tuple[str, str]]
    module_paths: frozenset[str]
    architecture: str
    num_parameters: int
    dtype: str
    repr: str
    config: str
    tokenizer_sha256: str
    tokenizer_files: dict[str, bytes]

    def config_json(self) -> str:
        return self.config


@dataclass(frozen=True)
class Finished:
    """A job's results on their way from a replica to the ingress (bytes: memoryviews do not pickle)."""

    document: bytes
    blobs: list[bytes]
    run_seconds: float


class ModelReplica:
    """One Serve replica of one model: the model loaded once, a single-model engine running its jobs.

    Authentication, quotas and decoding happen at the ingress; a replica trusts its callers (only the
    cluster reaches it) and receives validated graphs.
    """

    def __init__(self, spec: ModelSpec, cobatch: bool = True, cache_dir: str | None = None) -> None:
        from .loading import load_model  # here: transformers is imported by replicas only

        self.name = spec.name
        self.replica = Replica(load_model(spec, cache_dir=Path(cache_dir) if cache_dir else None))
        self.engine = Engine({spec.name: self.replica}, cobatch=cobatch, job_ttl=REPLICA_JOB_TTL)

    def info(self) -> ModelInfo:
        r = self.replica
        return ModelInfo(name=r.name, limits=r.limits, modules=r.modules, module_paths=r.module_paths,
                         architecture=r.architecture, num_parameters=r.num_parameters, dtype=r.dtype,
                         repr=repr(r.model), config=r.config_json(), tokenizer_sha256=r.tokenizer_sha256,
                         tokenizer_files=dict(r.loaded.tokenizer_files))

    async def run(self, job_id: str, user: str, payload: Any) -> AsyncIterator[Event | Finished]:
        """Queue a validated graph with this replica's scheduler and stream its events, then its results
        (`Finished`) or its error (an `error` Event). The caller cancelling the stream cancels the job."""
        job = Job(model=self.name, payload=payload, user=user, id=job_id)
        self.engine.jobs.add(job)
        try:
            self.engine.schedulers[self.name].submit(job)
        except FarscopeError as e:
            yield Event("error", error=e)
            return
        try:
            async for event in self.engine.events(job):
                if event.kind == "done":
                    result = job.result
                    yield Finished(result.document, [blob.tobytes() for blob in result.blobs], result.run_seconds)
                    return
                yield event  # `queued` first: the ingress learns that a replica has the job
        finally:  # the ingress cancelled the call (its client cancelled), or the stream broke
            if job.finished is None:
                self.engine.cancel(job)

    def check_health(self) -> None:
        """Serve's health probe: a replica whose worker is down is replaced."""
        if not self.engine.healthy:
            raise RuntimeError(f"model {self.name}: its worker is down")


class FarscopeIngress:
    """farscope's gRPC front (service.py) as a Serve deployment: a stateless ingress serving every model
    app named in `models` through deployment handles. Copies on one node share the port (SO_REUSEPORT)."""

    def __init__(self, models: list[str], host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                 stream_limits: dict[str, Any] | None = None, keys_db: str | None = None,
                 no_auth: bool = False) -> None:
        """`keys_db`: the API keys' SQLite file (default: the CLI's); `no_auth` serves everyone, as
        `farscope serve --no-auth` (for a cluster reached only from trusted machines)."""
        from .auth import KeyStore
        from .ray_ingress import start_ingress

        if no_auth:
            log.warning("authentication is off (no_auth): anyone who can reach %s:%d may use every model", host, port)
        keys = None if no_auth else KeyStore(keys_db or KeyStore.default_path())
        limits = StreamLimits(**stream_limits) if stream_limits else None
        self.server = start_ingress(models, host=host, port=port, keys=keys, stream_limits=limits)

    def check_health(self) -> None:
        if not self.server.engine.healthy:
            raise RuntimeError(f"models down: {', '.join(sorted(self.server.engine.down))}")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(grace=5.0)


def model_specs(models_file: str | Path) -> list[ModelSpec]:
    return load_models_file(models_file)


def deployment_for(spec: ModelSpec, *, cobatch: bool = True, cache_dir: str | None = None) -> Application:
    """The Serve application of one model: its deployment, named after it, with its [models.serve] options."""
    options = ServeOptions.of(spec).deployment_options()
    return serve.deployment(ModelReplica).options(name=spec.name, **options).bind(spec, cobatch, cache_dir)


def _spec(args: dict[str, Any]) -> ModelSpec:
    specs = {spec.name: spec for spec in model_specs(args["models_file"])}
    name = args["model"]
    if name not in specs:
        raise ValueError(f"{args['models_file']} declares no model {name!r}; it declares: {', '.join(specs)}")
    return specs[name]


def model_app(args: dict[str, Any]) -> Application:
    """Serve application builder of one model (serve.yaml: ``args: {models_file, model, cache_dir?}``)."""
    return deployment_for(_spec(args), cobatch=args.get("cobatch", True), cache_dir=args.get("cache_dir"))


def ingress_app(args: dict[str, Any]) -> Application:
    """Serve application builder of the gRPC ingress (``args: {models_file, host?, port?, replicas?,
    num_cpus?, resources?, keys_db?, no_auth?, stream_limits?}``; `resources` pins the ingress to the
    nodes that have them, those whose port the load balancer reaches): it serves every model of the file, each the Serve
    application of its name. API keys are checked against `keys_db` (SQLite: shared only by ingress
    copies that see the same file; shared stores are not written yet)."""
    models = [spec.name for spec in model_specs(args["models_file"])]
    ingress = serve.deployment(FarscopeIngress).options(
        name="ingress", num_replicas=args.get("replicas", 1),
        ray_actor_options={"num_cpus": args.get("num_cpus", 1), "resources": args.get("resources", {})})
    return ingress.bind(models, args.get("host", "0.0.0.0"), args.get("port", DEFAULT_PORT),
                        args.get("stream_limits"), args.get("keys_db"), args.get("no_auth", False))


def build_app(args: dict[str, Any]) -> dict[str, Application]:
    """Every application of a models file: {model name: its app} and the ingress under INGRESS_APP,
    for `serve.run` from Python (serve.yaml lists the same applications one by one)."""
    apps: dict[str, Application] = {
        spec.name: deployment_for(spec, cobatch=args.get("cobatch", True), cache_dir=args.get("cache_dir"))
        for spec in model_specs(args["models_file"])}
    apps[INGRESS_APP] = ingress_app(args)
    return apps
