"""Reference numbers for tests/nnsight_compat/: NNsight 0.8.1 running the same documented patterns on
the same SmolLM2 weights as a farscope server.

Run from the checkout's root with the project's venv:

    python bench/nnsight_reference.py            # writes tests/nnsight_compat/reference.json

It finds the converted weights the server uses (the GGUF conversion cache), makes sure NNsight lives in
bench/.nnsight-venv (see `overhead.ensure_nnsight_venv`), and runs itself there with `--side`: that half
imports nnsight, loads the weights as NNsight's `LanguageModel` (float32, CPU) and calls every function
of tests/nnsight_compat/patterns.py with `nnsight` and that model. Each pattern's summary (shapes, sums,
a few values: see tests/nnsight_compat/summary.py), or the error NNsight raised, is written to the JSON,
which is committed, so the compatibility tests need no NNsight.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPAT = ROOT / "tests" / "nnsight_compat"
OUTPUT = COMPAT / "reference.json"


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


PATTERN_SECONDS = 120


class PatternTimeout(Exception):
    pass


def _too_slow(signum: int, frame: Any) -> None:
    raise PatternTimeout(f"NNsight did not finish the pattern within {PATTERN_SECONDS} s")


def side(model_dir: str, output: Path, only: list[str]) -> None:
    """NNsight's half, inside its venv."""
    import warnings

    import nnsight
    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ.get("REFERENCE_THREADS", "2")))
    # NNsight runs `remote=True` on NDIF; its local run is the reference for the same code, so the
    # patterns run from a copy (a real file: NNsight reads its source) with `remote=False`.
    local = Path(tempfile.mkdtemp()) / "patterns.py"
    local.write_text((COMPAT / "patterns.py").read_text().replace("remote=True", "remote=False"))
    patterns = _load(local)
    summary = _load(COMPAT / "summary.py")
    model = nnsight.LanguageModel(model_dir, dispatch=True, dtype=torch.float32)
    signal.signal(signal.SIGALRM, _too_slow)

    results: dict[str, Any] = {}
    for name, fn in patterns.PATTERNS.items():
        if only and name not in only:
            continue
        signal.alarm(PATTERN_SECONDS)
        try:
            results[name] = {"ok": True, "summary": summary.summarize(fn(nnsight, model))}
        except Exception as error:  # the reference records what NNsight itself cannot run
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
            traceback.print_exc(limit=3, file=sys.stderr)
        finally:
            signal.alarm(0)
            if hasattr(model, "clear_edits"):
                model.clear_edits()
        print(f"[reference] {name}: {'ok' if results[name]['ok'] else results[name]['error'][:120]}",
              file=sys.stderr, flush=True)
        # Written after every pattern, merged into what is there: `--only` reruns a few.
        document = json.loads(output.read_text()) if output.is_file() else {"patterns": {}}
        document.update(nnsight=nnsight.__version__, torch=torch.__version__,
                        transformers=transformers.__version__)
        document["patterns"].update(results)
        output.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", metavar="MODEL_DIR", help="(internal) run NNsight's half on MODEL_DIR")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--only", nargs="*", default=[], help="run only these patterns")
    args = parser.parse_args()
    if args.side:
        side(args.side, args.output, args.only)
        return

    import transformers

    sys.path.insert(0, str(HERE))
    from overhead import NNSIGHT_VENV, _venv_python, ensure_nnsight_venv

    from farscope.server.config import DEFAULT_MODEL
    from farscope.server.loading import load_model

    model_dir = Path(load_model(DEFAULT_MODEL).model.name_or_path)
    ensure_nnsight_venv(NNSIGHT_VENV, transformers.__version__)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("PYTHONPATH", None)  # NNsight's side imports nothing of farscope
    command = [str(_venv_python(NNSIGHT_VENV)), str(Path(__file__).resolve()), "--side", str(model_dir),
               "--output", str(args.output), "--only", *args.only]
    subprocess.run(command, check=True, env=env, timeout=3600)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
