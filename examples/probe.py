"""A linear probe for truth on a remote model's activations, trained locally with torch.

    .venv/bin/python examples/probe.py                       # starts a local server of smollm2-135m
    .venv/bin/python examples/probe.py --address host:50051  # or uses a running one ($FARSCOPE_ADDRESS)

The data: 40 capital-like cities, each in a true statement ("The city of Lisbon is in Portugal.") and
a false one (the country of another city, picked by a seeded draw): 80 sentences, half true.
`collect_activations` reads the residual stream after every third layer at the last token (the full
stop) of every sentence — all layers in the same batched requests. For each layer, a logistic
regression (torch, full-batch L-BFGS on standardised features, L2 penalty) is fit on the statements
of 24 cities and scored on those of the other 16 (split by city, so a test city's true fact is never
seen in training). Expect chance at the embeddings and ~0.9 from the middle layers on (smollm2-135m).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

import farscope
from farscope.recipes import collect_activations

FACTS = [
    ("Paris", "France"), ("London", "England"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"),
    ("Vienna", "Austria"), ("Prague", "the Czech Republic"), ("Warsaw", "Poland"), ("Lisbon", "Portugal"),
    ("Dublin", "Ireland"), ("Oslo", "Norway"), ("Stockholm", "Sweden"), ("Helsinki", "Finland"),
    ("Athens", "Greece"), ("Budapest", "Hungary"), ("Amsterdam", "the Netherlands"), ("Brussels", "Belgium"),
    ("Tokyo", "Japan"), ("Beijing", "China"), ("Seoul", "South Korea"), ("Delhi", "India"), ("Cairo", "Egypt"),
    ("Nairobi", "Kenya"), ("Lagos", "Nigeria"), ("Sydney", "Australia"), ("Toronto", "Canada"),
    ("Chicago", "the United States"), ("Lima", "Peru"), ("Bogota", "Colombia"), ("Santiago", "Chile"),
    ("Istanbul", "Turkey"), ("Moscow", "Russia"), ("Bangkok", "Thailand"), ("Hanoi", "Vietnam"),
    ("Jakarta", "Indonesia"), ("Manila", "the Philippines"), ("Tehran", "Iran"), ("Baghdad", "Iraq"),
    ("Buenos Aires", "Argentina"), ("Havana", "Cuba"),
]
TEMPLATE = "The city of {} is in {}."


def dataset(seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """(sentences, labels: 1 = true, 0 = false): city k's true statement is row 2k, its false one 2k+1."""
    rng = random.Random(seed)
    sentences, labels = [], []
    for k, (city, country) in enumerate(FACTS):
        other = (k + 1 + rng.randrange(len(FACTS) - 1)) % len(FACTS)  # any city but this one
        sentences += [TEMPLATE.format(city, country), TEMPLATE.format(city, FACTS[other][1])]
        labels += [1, 0]
    return sentences, torch.tensor(labels)


def train_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor, torch.Tensor]:
    """Logistic regression on standardised features: (weight, bias, feature mean, feature std)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, y.float())
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return weight.detach(), bias.detach(), mean, std


def run(model: farscope.RemoteModel, layers: Sequence[int] | None = None, seed: int = 0, n_train_cities: int = 24,
        batch_size: int = 16, progress: bool = True) -> dict[int, dict[str, float]]:
    """Collect, split by city, train one probe per layer, score; returns {layer: accuracies} (and prints)."""
    sentences, labels = dataset(seed)
    n_layers = len(model.model.layers)
    layers = list(layers) if layers is not None else sorted({*range(0, n_layers, 3), n_layers - 1})
    points = [f"model.layers.{layer}" for layer in layers]
    started = time.perf_counter()
    collected = collect_activations(model, sentences, points, positions=-1, batch_size=batch_size,
                                    progress=progress)
    seconds = time.perf_counter() - started

    cities = torch.randperm(len(FACTS), generator=torch.Generator().manual_seed(seed))
    def rows_of(chosen: torch.Tensor) -> torch.Tensor:  # both statements of each chosen city
        return torch.stack([2 * chosen, 2 * chosen + 1], 1).flatten()

    train, test = rows_of(cities[:n_train_cities]), rows_of(cities[n_train_cities:])

    print(f"collected {len(points)} x {tuple(collected[points[0]].shape)} activations in {seconds:.1f} s; "
          f"linear probe true vs false, {len(train)} train / {len(test)} test sentences")
    def accuracy(probe: tuple[torch.Tensor, ...], x: torch.Tensor, rows: torch.Tensor) -> float:
        weight, bias, mean, std = probe
        predicted = (((x[rows] - mean) / std) @ weight + bias > 0).long()
        return float((predicted == labels[rows]).float().mean())

    results = {}
    for layer, point in zip(layers, points, strict=True):
        x = collected[point].float()  # [n_sentences, d_model]
        probe = train_probe(x[train], labels[train])
        results[layer] = {"train_accuracy": accuracy(probe, x, train), "test_accuracy": accuracy(probe, x, test)}
        print(f"  layer {layer:>2}: train accuracy {results[layer]['train_accuracy']:.3f}   "
              f"test accuracy {results[layer]['test_accuracy']:.3f}")
    return results


@contextmanager
def local_server() -> Iterator[str]:
    """`farscope serve` (the default model, auth off on loopback) in a child process; yields its address."""
    command = [sys.executable, "-m", "farscope.server.cli", "serve", "--no-auth", "--port", "0",
               "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        while True:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"farscope serve exited with code {process.wait()}")
            if line.startswith("farscope: serving"):
                break
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("FARSCOPE_ADDRESS"),
                        help="a running farscope server (default: $FARSCOPE_ADDRESS, else start one here)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="*", default=None,
                        help="layers to probe (default: every third, and the last)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.address:
        with farscope.RemoteModel(args.model, address=args.address) as model:
            run(model, layers=args.layers, seed=args.seed)
        return 0
    with local_server() as address, farscope.RemoteModel(args.model, address=address) as model:
        run(model, layers=args.layers, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
