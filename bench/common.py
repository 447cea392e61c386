"""Timing helpers shared by the benches: interleaved rounds, medians, a table, JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from graphfreeze.text import text_table  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def sync(value) -> None:
    """Wait for a step's result so its time is really spent."""
    for leaf in tf.nest.flatten(value):
        if hasattr(leaf, "numpy"):
            leaf.numpy()


def arguments(doc: str, *, rounds: int, steps: int | None = None) -> argparse.ArgumentParser:
    """The options every timing bench takes: --rounds, --steps (when it times steps), --quick."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    if steps is not None:
        parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    return parser


def interleaved(runners: dict[str, Callable[[], object]], *, rounds: int, steps: int,
                warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each runner, alternating runners round by round."""
    for run in runners.values():
        for _ in range(warmup):
            sync(run())
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = run()
            sync(out)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def train_step(model, optimizer, loss_fn=None):
    """The canonical custom training step every bench variant runs (plain Python)."""
    import keras
    loss_fn = loss_fn or keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    return "\n".join([title, *text_table(header, rows)])


def publish(name: str, title: str, times: dict[str, float], reference: str, ratio_key: str,
            config: dict, argv: list[str] | None, script: str, quick: bool) -> str:
    """Print a ratio table and write bench/results/NAME.json; returns the JSON path."""
    ref = times[reference]
    print(table(title, [(k, f"{v * 1e3:.2f}", f"{v / ref:.3f}") for k, v in times.items()],
                ("variant", "ms/step", f"x {reference}")))
    return write_json(name + ("_quick" if quick else ""), {
        "config": config, "seconds_per_step": times,
        ratio_key: {k: v / ref for k, v in times.items()},
        "command": f"python bench/{script} " + " ".join(argv or sys.argv[1:])})


def machine() -> dict[str, object]:
    return {"python": sys.version.split()[0], "tensorflow": tf.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count()}


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=2)
    return path
