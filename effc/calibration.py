"""Calibration inputs from files (DESIGN.md section 7): ``.npz`` of named arrays stacked as
N x input shape, or a ``.txt`` file of text for language models, tokenized with the model's own
tokenizer (an HF folder) into the first N non-overlapping windows of ``seqlen`` tokens; or
``images`` (``--calib images``): random crops of real photographs bundled with scikit-image, at
the size of the model's image input, ImageNet-normalised (``effc.models.images``; the
evaluation images of effc's own quality tables are never among them); or ``synthetic`` (``--calib
synthetic``): images synthesized from a torch model's own BatchNorm statistics, no data needed
(``effc.synthetic``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from effc.errors import InputError, UnsupportedError
from effc.inputs import check_inputs, is_image, load_npz, resolve_shape
from effc.models.images import calibration_crops
from effc.synthetic import synthesize


def from_npz(path: str, model, samples: int = 0) -> list[dict[str, np.ndarray]]:
    arrays = load_npz(path)
    n = min((len(a) for a in arrays.values()), default=0)
    n = min(n, samples) if samples else n
    data = [{k: v[i] for k, v in arrays.items()} for i in range(n)]
    if data:
        try:
            # a torch model takes any sequence length or image size; an ONNX file its own
            sizes = getattr(model, "kind", "fx") == "onnx"
            check_inputs(model.input_specs(), data[0], sizes=sizes)
        except InputError as e:
            raise InputError(
                f"--calib {path}: {e} (arrays are stacked samples: N x input shape)"
            ) from e
    return data


def _image_input(model, source: str, shapes: dict | None):
    """(name, N, C, H, W) of the model's one image input, or a one-line error."""
    specs = model.input_specs()
    images = [s for s in specs if is_image(s)]
    if len(specs) != 1 or len(images) != 1:
        raise InputError(
            f"--calib {source} feeds one image input (N x 3 x H x W float); the model's inputs "
            "are " + ", ".join(f"{s.name} {s.shape}" for s in specs)
        )
    return images[0].name, *resolve_shape(images[0], shapes or {})


def from_images(model, samples: int = 0, shapes: dict | None = None) -> list[dict]:
    """``samples`` (default 64) crops for the model's one image input (N x 3 x H x W float)."""
    name, n, c, h, w = _image_input(model, "images", shapes)
    if h != w:
        raise InputError(f"--calib images makes square crops; the input is {h}x{w}")
    crops = calibration_crops(samples or 64, size=h)
    return [{name: crops[i : i + 1].repeat(n, 0)} for i in range(len(crops))]


def from_synthetic(
    model, samples: int = 0, shapes: dict | None = None, seed: int = 0, **options
) -> tuple[list[dict], dict]:
    """``samples`` (default 64) images synthesized from the torch model's BatchNorm statistics
    for its one image input, and the synthesis report."""
    name, n, c, h, w = _image_input(model, "synthetic", shapes)
    module = getattr(model, "module", None)
    if getattr(model, "kind", "fx") != "fx" or module is None:
        raise UnsupportedError(
            "--calib synthetic optimizes inputs through the model's own layers and needs a torch "
            "model; for an ONNX file give images (--calib images) or an .npz"
        )
    images, report = synthesize(module, (c, h, w), samples or 64, seed=seed, **options)
    return [{name: images[i : i + 1].repeat(n, 0)} for i in range(len(images))], report


def from_text(
    path: str, model_ref: str, model, samples: int, seqlen: int
) -> list[dict[str, np.ndarray]]:
    folder = Path(model_ref)
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise InputError(
            f"--calib {path}: text calibration needs the model's tokenizer; give an HF model folder"
        )
    if not Path(path).is_file():
        raise InputError(f"no such calibration file: {path}")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise UnsupportedError(
            "text calibration needs transformers: pip install 'effc[llm]'"
        ) from e
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="np", add_special_tokens=False)["input_ids"][0]
    n = samples or max(1, len(ids) // seqlen)
    if len(ids) < n * seqlen:
        raise InputError(
            f"--calib {path}: {len(ids)} tokens, fewer than {n} samples x {seqlen} tokens"
        )
    names = [s.name for s in model.input_specs()]
    data = []
    for i in range(n):
        window = ids[i * seqlen : (i + 1) * seqlen][None].astype(np.int64)
        sample = {"input_ids": window}
        if "attention_mask" in names:
            sample["attention_mask"] = np.ones_like(window)
        data.append(sample)
    return data


SYNTHETIC = "synthetic"


def load(
    source: str,
    model,
    model_ref: str = "",
    samples: int = 0,
    seqlen: int = 512,
    shapes: dict | None = None,
    seed: int = 0,
) -> tuple[list[dict], dict]:
    """The calibration samples ``--calib source`` names, and what goes into the report about
    them. ``A+synthetic`` is A's samples followed by as many synthesized images: with
    ``samples`` = N, N // 2 of A and the rest synthesized (a user's few images widened by images
    shaped like the model's training data)."""
    base, plus, extra = source.rpartition("+")
    if plus and extra == SYNTHETIC and base:
        if samples == 1:
            raise InputError(f"--calib {source} takes half its samples from each: give 2 or more")
        data, info = load(base, model, model_ref, samples // 2, seqlen, shapes, seed)
        made, report = from_synthetic(
            model, samples - len(data) if samples else len(data), shapes, seed
        )
        return data + made, {
            "file": source,
            "samples": len(data) + len(made),
            "synthesized": report,
        }
    info: dict = {"file": source}
    if source == "images":
        data = from_images(model, samples, shapes)
    elif source == SYNTHETIC:
        data, info["synthesized"] = from_synthetic(model, samples, shapes, seed)
    elif source.endswith(".txt"):
        data = from_text(source, model_ref, model, samples, seqlen)
        info["seqlen"] = seqlen
    else:
        data = from_npz(source, model, samples)
    return data, {**info, "samples": len(data)}
