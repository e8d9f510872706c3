"""The client installs and imports without the server's dependencies (DESIGN.md: a laptop needs none)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("farscope.server", "transformers", "accelerate")

_SCRIPT = """
import json, sys
import farscope, farscope.client
import farscope.client.envoy, farscope.client.model, farscope.client.proxy, farscope.client.tracing
import farscope.client.tracer_stack, farscope.client.runner
import farscope.client.transport, farscope.interventions.codec, farscope.interventions.validate
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_the_client_loads_no_server_code() -> None:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert "farscope.client" in modules  # the probe did import what it claims
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not loaded, f"importing the client pulled in server-side modules: {loaded}"
