"""The Ray Serve and KubeRay files of deploy/ are valid: Serve's own config schema accepts them, their
import paths are farscope's application builders, and the models file they name gives valid Serve options.
(Not run here: a Kubernetes cluster; KubeRay's CRD schema is not installed, so rayservice.yaml is
checked for the fields KubeRay reads.)"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
yaml = pytest.importorskip("yaml")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from farscope.server.ray_serve import INGRESS_APP, ServeOptions, model_specs  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _builder(import_path: str) -> object:
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)


def _check_serve_config(config: dict) -> None:
    schema = ServeDeploySchema.model_validate(config)
    names = [app.name for app in schema.applications]
    assert INGRESS_APP in names
    specs = {spec.name: spec for spec in model_specs(DEPLOY / "ray" / "models.toml")}
    for app in schema.applications:
        assert callable(_builder(app.import_path)), app.import_path
        if app.name != INGRESS_APP:  # each model app is named after its model, which the models file declares
            assert app.args["model"] == app.name and app.name in specs
            ServeOptions.of(specs[app.name]).deployment_options()
    assert set(specs) <= set(names), "a model of the models file has no Serve application"


def test_serve_yaml_is_a_valid_serve_config() -> None:
    _check_serve_config(yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text()))


def test_rayservice_runs_the_same_serve_config_and_exposes_the_grpc_port() -> None:
    documents = {document["kind"]: document
                 for document in yaml.safe_load_all((DEPLOY / "k8s" / "rayservice.yaml").read_text())}
    service, balancer, claim = documents["RayService"], documents["Service"], documents["PersistentVolumeClaim"]
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((DEPLOY / "ray" / "serve.yaml").read_text())
    _check_serve_config(embedded)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert 50051 in [port["containerPort"] for port in head["ports"]]
    assert balancer["spec"]["ports"][0]["targetPort"] == 50051
    assert balancer["spec"]["selector"]["ray.io/node-type"] == "head"
    volumes = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert claim["metadata"]["name"] in [v.get("persistentVolumeClaim", {}).get("claimName") for v in volumes]
    pod = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    resources = json.loads(json.loads(service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
                                      ["resources"]))
    assert resources == {"farscope-ingress": 1}  # where serve.yaml's ingress asks to run
