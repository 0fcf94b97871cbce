"""Train, evaluate and export the example models: ``python -m examples.build OUT_DIR``.

Writes, per model: ``<name>.pt2``, ``<name>-data.safetensors`` (training inputs),
``<name>-eval.safetensors`` (held-out inputs) and ``<name>-labels.safetensors`` (their labels).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from safetensors.numpy import load_file

from examples import digits, text
from examples.common import ExampleArtifacts, train_classifier_, write_artifacts

__all__ = ["ExampleArtifacts", "build_digits", "build_text", "evaluate_onnx_accuracy", "main"]

SEED = 0


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch on one thread, then restore: same numbers on any core count, no oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_digits(out_dir: str | Path, quick: bool = False) -> ExampleArtifacts:
    """Train the digits CNN on an 80/20 split of sklearn's digits and write its artifacts."""
    with _single_threaded():
        train_images, train_labels, test_images, test_labels = digits.load_split(SEED)
        torch.manual_seed(SEED)
        model = digits.DigitsCNN()
        seconds = train_classifier_(
            model,
            {"image": train_images},
            train_labels,
            epochs=2 if quick else 10,
            batch_size=32,
            lr=3e-3 if quick else 1e-3,
            weight_decay=0.01,
            seed=SEED,
        )
        return write_artifacts(
            "digits",
            Path(out_dir),
            model,
            {"image": train_images},
            {"image": test_images},
            test_labels,
            num_classes=digits.NUM_CLASSES,
            train_seconds=seconds,
        )


def build_text(out_dir: str | Path, quick: bool = False) -> ExampleArtifacts:
    """Train the docstring transformer (six stdlib areas) and write its artifacts."""
    with _single_threaded():
        train_inputs, train_labels, test_inputs, test_labels, vocab_size = text.load_split(
            per_class=80 if quick else None, seed=SEED
        )
        torch.manual_seed(SEED)
        model = text.TextClassifier(vocab_size)
        seconds = train_classifier_(
            model,
            train_inputs,
            train_labels,
            epochs=3 if quick else 10,
            batch_size=32,
            lr=5e-3 if quick else 2e-3,
            weight_decay=0.05,
            seed=SEED,
        )
        return write_artifacts(
            "text",
            Path(out_dir),
            model,
            train_inputs,
            test_inputs,
            test_labels,
            num_classes=len(text.CLASSES),
            train_seconds=seconds,
        )


def evaluate_onnx_accuracy(
    onnx_path: str | Path, eval_path: str | Path, labels_path: str | Path, batch_size: int = 512
) -> float:
    """Return the top-1 accuracy of an ONNX model's FIRST output on an eval file's inputs."""
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = load_file(str(eval_path))
    labels = load_file(str(labels_path))["labels"]
    names = [node.name for node in session.get_inputs()]
    predictions = [
        session.run(None, {name: inputs[name][start : start + batch_size] for name in names})[
            0
        ].argmax(-1)
        for start in range(0, len(labels), batch_size)
    ]
    return float(np.mean(np.concatenate(predictions) == labels))


BUILDERS: dict[str, Callable[..., ExampleArtifacts]] = {"digits": build_digits, "text": build_text}


def main(argv: list[str] | None = None) -> int:
    """Build the examples named on the command line (all by default) and print their accuracy."""
    parser = argparse.ArgumentParser(prog="python -m examples.build", description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder for the .pt2 and .safetensors files")
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build just this example")
    parser.add_argument("--quick", action="store_true", help="fewer epochs, smaller corpus")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else list(BUILDERS):
        result = BUILDERS[name](args.out_dir, quick=args.quick)
        print(
            f"{name}: test accuracy {result.accuracy:.4f} ({result.num_classes} classes, "
            f"chance {1 / result.num_classes:.3f}), trained in {result.train_seconds:.1f}s "
            f"-> {result.program}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
