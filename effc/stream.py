"""Streaming compression of HF folders larger than memory, one block at a time: LLaMA-family
causal LMs (``CausalLM``) and BERT-family encoders (``Encoder``).

The model is built on the ``meta`` device (no memory); its safetensors files are opened
memory-mapped. The embeddings (and a causal LM's rotary embedding) are made real to compute the
first block's calibration inputs (exactly what the HF model hands its first layer), then each
layer in turn is read from the files in fp32, compressed by the pipeline's passes (the same pass
code as in memory, on an FX model of that one block whose layers keep their HF names), written to
its own shard of the artifact, run on the calibration inputs to give the next block's inputs, and
dropped. The last stage is a causal LM's final norm and ``lm_head``, or an encoder's pooler
(none where the checkpoint has no pooler). Encoders stream on unpadded windows, so their layers
run without a mask, as the HF model runs them on an all-ones mask. Peak memory is one block in
fp32, the passes' statistics for it (GPTQ's Hessians), the calibration hidden states and the
embeddings while the first inputs are made: it does not grow with the number of blocks.

Each pass calibrates a stage on what the in-memory pass would see: with ``sequential=true`` the
hidden states through the stages before it as compressed by this pass and every earlier one,
without it through those stages as the earlier passes left them. One stream of hidden states is
kept per distinct need (a pipeline of P passes keeps at most P + 1), so streaming gives the same
weights as the in-memory pipeline (tested), at one stage forward per stream.

Passes that stream: ``group-prune`` (scope row or layer, uniform allocation), ``nm-prune``,
``quantize`` (RTN or GPTQ), ``gqsa-train`` as BQPO, and ``remove-blocks`` as the first pass with
``score=cosine`` or ``random``: a first sweep reads each original block once and runs the
calibration inputs through it to score it (the in-memory pass's cosine of the hidden state
entering and leaving it), then the compression sweep skips the removed blocks and writes the rest
renumbered, with ``num_hidden_layers`` (and ``layer_types``) in the written config to match;
and ``share-blocks`` first (or right after ``remove-blocks``; ``choose=first`` or ``mean``, not
``fit``, which measures every block in the unshared model): each group of blocks that share
weights is one stage, read together (memory grows to one group), its linear weights shared as the
in-memory pass shares them before the other passes run on the group (so GPTQ's Hessians of a
shared weight sum over its blocks, as in memory), written once with ``shared`` in the index
naming the block each other block reads; ``load`` gives those blocks the same Parameters, or
``BSRLinear`` over the same packed arrays, with their own biases and norms. Passes after
share-blocks stream without ``sequential=true`` (refused in memory too) and without
``gqsa-train`` (BQPO trains a shared weight against all its blocks at once). Any
other pass, or an option that needs the whole model at once (``scope=global``,
``allocate=sensitivity``, block gates), is refused with a one-line error before any work.

The artifact (``--target bsr``): ``config.json``; one safetensors shard per block
(``model-00001-of-000NN.safetensors``, the embeddings and head in the last), each quantized
linear layer as its BSR arrays (``<layer>.indptr``, ``.indices``, ``.values``, ``.scales``,
``.zeros``: ``effc.runtime.format``'s encoding) and every other tensor dense in the source
dtype; ``model.bsr.index.json`` maps each tensor to its shard and lists the BSR layers with their
shape, group and bits; ``report.json`` has one record per stage (seconds, peak memory, the passes'
statistics). ``load`` builds the model from it, memory-mapped, with every BSR layer a
``BSRLinear``.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from effc import __version__
from effc.artifact import prepare_output, write_artifact
from effc.context import PassContext
from effc.errors import InputError, UnsupportedError
from effc.ir.calibrate import capture_block_inputs
from effc.ir.model import InputSpec
from effc.passes.remove_blocks import chosen, random_scores, renumber_config, token_cosines
from effc.passes.share_blocks import groups_of, share_linears
from effc.pipeline import Pipeline, as_model
from effc.progress import bar
from effc.runtime import format as bsr_format
from effc.runtime.format import BSRMatrix
from effc.runtime.modules import BSRLinear, matrix_from_state

NAME = "bsr-stream"  # the artifact's backend in its manifest (``effc run`` reads it)
VERIFY_SAMPLES = 4  # calibration inputs each stage's output error is measured on
STREAMABLE = (
    "remove-blocks",
    "share-blocks",
    "group-prune",
    "nm-prune",
    "quantize",
    "gqsa-train",
)
INDEX = "model.bsr.index.json"


# ---------------------------------------------------------------- the source folder
class SafetensorsSource:
    """The tensors of an HF folder's safetensors files (one file or an index of shards), opened
    memory-mapped: a tensor is read from disk only when asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{index}: not a safetensors index ({e})") from e
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise InputError(f"{folder}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        for name in files:
            path = (self.folder / name).resolve()
            if self.folder not in path.parents:
                raise InputError(f"{index}: shard {name!r} lies outside the model folder")
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise InputError(f"{path}: not a readable safetensors file ({e})") from e
        self._where = weight_map or dict.fromkeys(self._handles[files[0]].keys(), files[0])

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise InputError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name)

    def _slice(self, name: str):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> list[int]:
        """A tensor's shape, from the file header (nothing is read)."""
        return list(self._slice(name).get_shape())

    def dtype(self) -> torch.dtype:
        """The weights' dtype (of the first ``.weight`` tensor), from the file header."""
        name = next((n for n in self._where if n.endswith(".weight")), next(iter(self._where)))
        code = self._slice(name).get_dtype()
        return _DTYPES.get(code, torch.float32)


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def materialize(module: nn.Module, source: SafetensorsSource, prefix: str) -> None:
    """Give a meta-device ``module`` real fp32 parameters read from ``source`` (names
    ``prefix + parameter name``); buffers too where the checkpoint has them (integer ones keep
    their dtype). A module already on the CPU keeps the buffers it made."""
    if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        module.to_empty(device="cpu")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, p in [*params.items(), *module.named_buffers()]:
            key = prefix + name
            if name not in params and key not in source:
                continue  # a buffer its module makes (rotary frequencies)
            t = source.get(key)
            if tuple(t.shape) != tuple(p.shape):
                raise InputError(
                    f"{source.folder}: {key} is {tuple(t.shape)}, the config says {tuple(p.shape)}"
                )
            p.data = t.to(torch.float32) if t.is_floating_point() else t


def release(module: nn.Module) -> None:
    """Drop a module's tensors (back to the meta device) and collect what a stage left: FX graphs
    are reference cycles, which Python frees only when its cycle collector runs, so without a
    collection a finished block's weights could outlive it; then hand freed heap pages back to
    the system (glibc's malloc_trim), so RssAnon shows what is really held."""
    module.to_empty(device="meta")
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


# ---------------------------------------------------------------- when to stream
IN_MEMORY_FACTOR = 2.5  # the in-memory path's peak, in fp32 copies of the model (measured)


def fp32_bytes(folder: str | Path) -> int:
    """The model's size in fp32, from the safetensors headers (nothing is read)."""
    source = SafetensorsSource(folder)
    return sum(4 * int(np.prod(source.shape(n), dtype=np.int64)) for n in source.names())


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


SPILL_FRACTION = 0.25  # streams above this share of MemAvailable go to disk


class Spill:
    """Calibration streams on disk: each hidden-state tensor a ``.npy`` file in the work folder,
    read back memory-mapped (file pages the kernel can drop, not anonymous memory), so the
    streams' size is bounded by the disk, not by memory. A stage's files are deleted once the
    state after the next stage names the new ones."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names: dict[int, str] = {}  # id of a mapped tensor -> its file
        self._alive: dict[str, torch.Tensor] = {}

    def put(self, name: str, t: torch.Tensor) -> torch.Tensor:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.npy"
        tmp = path.with_suffix(".tmp.npy")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(t.shape))
        array[...] = t.detach().float().numpy()
        array.flush()
        del array
        os.replace(tmp, path)
        return self.get(path.name)

    def get(self, name: str) -> torch.Tensor:
        # copy-on-write: a tensor torch may treat as writable; nothing writes to it
        t = torch.from_numpy(np.load(self.folder / name, mmap_mode="c"))
        self.names[id(t)], self._alive[name] = name, t
        return t

    def forget(self, keep: set[str]) -> None:
        """Delete every stream file not in ``keep`` (the names the saved state refers to)."""
        for name in [n for n in self._alive if n not in keep]:
            self.names.pop(id(self._alive.pop(name)), None)
        for f in self.folder.glob("*.npy"):
            if f.name not in keep:
                f.unlink(missing_ok=True)


def should_spill(calibration: list[dict], hidden: int, streams: int) -> bool:
    """Would ``streams`` fp32 hidden-state streams over ``calibration`` take more than
    SPILL_FRACTION of the memory available?"""
    tokens = sum(int(np.asarray(x["input_ids"]).size) for x in calibration)
    available = mem_available()
    return bool(available) and tokens * hidden * 4 * streams > SPILL_FRACTION * available


def stream_reason(folder: str | Path) -> str | None:
    """Why an HF folder should stream (it would not fit in memory), or None."""
    need, have = IN_MEMORY_FACTOR * fp32_bytes(folder), mem_available()
    if have and need > have:
        return (
            f"in memory it would take about {need / 2**30:.1f} GiB ({IN_MEMORY_FACTOR}x its fp32 "
            f"size) and {have / 2**30:.1f} GiB is available"
        )
    return None


class StreamInputs:
    """What calibration readers ask of a model (its input names) for a streamed causal LM."""

    def input_specs(self):

        return [
            InputSpec("input_ids", ["batch", "sequence"], "int64"),
            InputSpec("attention_mask", ["batch", "sequence"], "int64"),
        ]


# ---------------------------------------------------------------- the pipeline check
def check_streamable(pipeline) -> None:
    """One-line error for a pass or option that needs the whole model at once."""
    leaves = pipeline.leaves()
    names = [getattr(p, "name", type(p).__name__) for p in leaves]
    shared = "share-blocks" in names
    for k, (p, name) in enumerate(zip(leaves, names)):
        if name == "remove-blocks" and (k or p.options.score not in ("cosine", "random")):
            raise UnsupportedError(
                "pass 'remove-blocks' streams as the first pass with score=cosine or random (a "
                "sweep over the original blocks picks them); score=gates needs block-gates and "
                "score=greedy runs the model with blocks skipped, both the whole model"
            )
        if name == "share-blocks" and names[:k] not in ([], ["remove-blocks"]):
            raise UnsupportedError(
                "pass 'share-blocks' streams as the first pass, or right after remove-blocks: "
                "it shares the original weights of each group of blocks"
            )
        if name == "share-blocks" and p.options.choose == "fit":
            raise UnsupportedError(
                "pass 'share-blocks': choose=fit measures every block's inputs in the unshared "
                "model and does not stream; use choose=first or mean, or compress in memory"
            )
        if shared and k > names.index("share-blocks"):
            if name == "gqsa-train":
                raise UnsupportedError(
                    "pass 'gqsa-train' after share-blocks does not stream: BQPO trains a shared "
                    "weight against all its blocks at once; compress in memory"
                )
            if getattr(p.options, "sequential", False):
                raise UnsupportedError(
                    f"pass '{name}': sequential calibration compresses block by block, and "
                    "share-blocks shares weights across blocks: use sequential=false"
                )
        if name not in STREAMABLE:
            raise UnsupportedError(
                f"pass '{name}' needs the whole model in memory and does not stream; passes "
                f"that stream: {', '.join(STREAMABLE)}"
            )
        o = p.options
        if name == "gqsa-train" and (o.stage != "bqpo" or o.target != "local" or o.tail):
            raise UnsupportedError(
                "pass 'gqsa-train' streams as stage=bqpo with target=local and tail=false (each "
                "block against its own original); stage=e2e, target=model and tail=true need the "
                "whole model or the original model's hidden states and do not stream"
            )
        if getattr(o, "scope", "row") == "global" or getattr(o, "allocate", "") == "sensitivity":
            raise UnsupportedError(
                f"pass '{name}': scope=global and allocate=sensitivity compare layers across the "
                "whole model and do not stream"
            )


def _streams(passes) -> tuple[list[int], list[int]]:
    """For each pass k (1-based), the calibration stream it reads, and every stream to keep.

    Stream j is the hidden states through the blocks with passes 1..j applied. In memory, a pass
    with ``sequential=true`` calibrates block i on blocks < i already compressed by itself (and by
    every earlier pass): stream k; without it, on the model as the earlier passes left it: stream
    k - 1. Keeping each stream a pass reads (and the last, for tracing) reproduces both exactly."""
    reads = [k if _sequential(p) else k - 1 for k, p in enumerate(passes, 1)]
    calibrated = {r for r, p in zip(reads, passes) if p.needs_calibration()}
    return reads, sorted(calibrated | {len(passes)})


def _sequential(p) -> bool:
    """Does ``p`` calibrate block i on blocks < i it already compressed? (``sequential=true``;
    gqsa-train's bqpo always: it trains each block on the outputs of the trained blocks before.)"""
    return bool(getattr(p.options, "sequential", False)) or getattr(p, "name", "") == "gqsa-train"


def _one_pass(p):
    """A pipeline of one copy of ``p`` with ``sequential`` off: the stream it reads already holds
    the compressed blocks before this one."""
    q = copy.deepcopy(p)
    if hasattr(q.options, "sequential"):
        q.options.sequential = False
    return Pipeline([q])


# ---------------------------------------------------------------- stages
class _Stage(nn.Module):
    """One decoder layer, a group of consecutive layers (blocks sharing weights) or the head as
    a model of its own whose submodules keep their HF names (``model.layers.3.self_attn.q_proj``),
    taking the tensors the HF model gives it."""

    def __init__(self, example: dict[str, torch.Tensor]):
        super().__init__()
        self._example = example

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return self._example


def _stage_name(container: str, indices: list[int]) -> str:
    last = f"-{indices[-1]}" if len(indices) > 1 else ""
    return f"{container}.{indices[0]}{last}"


def _unwrap(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockStage(_Stage):
    """Decoder layers of a causal LM in turn: (hidden_states, cos, sin) -> hidden_states."""

    def __init__(self, layers: dict[int, nn.Module], example):
        super().__init__(example)
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})
        self.name = _stage_name("model.layers", list(layers))

    def forward(self, hidden_states, cos, sin):
        for layer in self.model.layers.values():
            hidden_states = _unwrap(
                layer(
                    hidden_states,
                    attention_mask=None,
                    position_embeddings=(cos, sin),
                    use_cache=False,
                )
            )
        return hidden_states


class EncoderStage(_Stage):
    """Encoder layers of a BERT-family model in turn, on unpadded inputs (no mask):
    hidden_states -> hidden_states."""

    def __init__(self, layers: dict[int, nn.Module], example):
        super().__init__(example)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleDict({str(i): layer for i, layer in layers.items()})
        self.name = _stage_name("encoder.layer", list(layers))

    def forward(self, hidden_states):
        for layer in self.encoder.layer.values():
            hidden_states = _unwrap(layer(hidden_states, attention_mask=None))
        return hidden_states


class HeadStage(_Stage):
    def __init__(self, norm: nn.Module, lm_head: nn.Module, example):
        super().__init__(example)
        self.model = nn.Module()
        self.model.norm = norm
        self.lm_head = lm_head
        self.name = "head"

    def forward(self, hidden_states):
        return self.lm_head(self.model.norm(hidden_states))


class PoolerStage(_Stage):
    """A BERT pooler (dense + tanh of the first token's state)."""

    def __init__(self, pooler: nn.Module, example):
        super().__init__(example)
        self.pooler = pooler
        self.name = "head"

    def forward(self, hidden_states):
        return self.pooler(hidden_states)


def _check_windows(calibration: list[dict]) -> list[dict]:
    """The token windows streaming calibrates on (input_ids only: unpadded, so no mask)."""
    for x in calibration:
        if "input_ids" not in x:
            raise InputError("streaming calibrates on token windows (input_ids)")
        mask = x.get("attention_mask")
        if mask is not None and not np.all(np.asarray(mask) == 1):
            raise UnsupportedError("streaming calibrates on unpadded windows (mask all ones)")
    return [{"input_ids": np.asarray(x["input_ids"])} for x in calibration]


class _Family:
    """What the model families share: reading blocks from the source into a stage."""

    prefix = ""  # the checkpoint's base-model prefix of every name (an encoder's ``bert.``)
    stage: type[_Stage]

    def block(self, blocks: dict[int, int], example: tuple) -> _Stage:
        """Blocks of the source, read from it: {output index: source index}."""
        for i in blocks.values():
            materialize(self.layers[i], self.source, f"{self.prefix}{self.container}.{i}.")
        layers = {j: self.layers[i] for j, i in blocks.items()}
        return self.stage(layers, dict(zip(self.inputs, example)))


class CausalLM(_Family):
    """A LLaMA-family causal LM: model.embed_tokens, model.layers, model.norm, lm_head."""

    kind = "causal-lm"
    stage = BlockStage
    container = "model.layers"
    inputs = ("hidden_states", "cos", "sin")

    def __init__(self, model, source: SafetensorsSource):
        self.model, self.source = model, source
        self.layers = model.model.layers

    def first_inputs(self, calibration: list[dict]) -> list[tuple]:
        """(hidden_states, cos, sin) the first decoder layer receives for each calibration
        input: the HF model's own forward up to that layer, with only the embedding table and
        the rotary embedding real."""
        inner = self.model.model
        inputs = _check_windows(calibration)
        materialize(inner.embed_tokens, self.source, "model.embed_tokens.")
        with torch.device("cpu"):
            inner.rotary_emb = type(inner.rotary_emb)(config=self.model.config)
        try:
            captured = capture_block_inputs(self.model, self.layers[0], inputs)
        finally:
            release(inner.embed_tokens)
        out = []
        for args, kwargs in captured:
            if kwargs.get("attention_mask") is not None:
                raise UnsupportedError("streaming calibrates on unpadded windows (no mask)")
            cos, sin = kwargs["position_embeddings"]
            out.append((args[0], cos, sin))
        return out

    def head(self, example: torch.Tensor) -> tuple[_Stage, dict]:
        """The last stage (final norm and lm_head, read from the source) and the tensors outside
        every stage its shard also holds (the embedding table)."""
        model, source = self.model, self.source
        materialize(model.model.norm, source, "model.norm.")
        head = "lm_head." if "lm_head.weight" in source else "model.embed_tokens."
        materialize(model.lm_head, source, head)
        stage = HeadStage(model.model.norm, model.lm_head, {"hidden_states": example})
        return stage, {"model.embed_tokens.weight": source.get("model.embed_tokens.weight")}


def _cpu_embeddings(model) -> None:
    """Give an encoder embeddings built on the CPU (in eval mode), so the buffers they make
    (position and token type ids, absent from many checkpoints) are real; the weights are read
    into them afterwards."""
    with torch.device("cpu"):
        model.embeddings = type(model.embeddings)(model.config).eval()


class Encoder(_Family):
    """A BERT-family encoder (BertModel and kin): embeddings, encoder.layer, an optional pooler.
    Checkpoint names may carry the base model's prefix (``bert.``) when saved from a task model."""

    kind = "encoder"
    stage = EncoderStage
    container = "encoder.layer"
    inputs = ("hidden_states",)

    def __init__(self, model, source: SafetensorsSource):
        self.model, self.source = model, source
        self.layers = model.encoder.layer
        base = f"{getattr(model, 'base_model_prefix', '')}."
        self.prefix = base if f"{base}embeddings.word_embeddings.weight" in source else ""

    def first_inputs(self, calibration: list[dict]) -> list[tuple]:
        """The hidden states the first encoder layer receives (the embeddings' output)."""
        inputs = _check_windows(calibration)
        _cpu_embeddings(self.model)
        materialize(self.model.embeddings, self.source, f"{self.prefix}embeddings.")
        try:
            captured = capture_block_inputs(self.model, self.layers[0], inputs)
        finally:
            release(self.model.embeddings)
        out = []
        for args, kwargs in captured:
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if mask is not None:
                raise UnsupportedError("streaming calibrates on unpadded windows (no mask)")
            out.append((args[0] if args else kwargs["hidden_states"],))
        return out

    def has_pooler(self) -> bool:
        return f"{self.prefix}pooler.dense.weight" in self.source

    def head(self, example: torch.Tensor) -> tuple[_Stage | None, dict]:
        """The pooler stage (None where the checkpoint has no pooler) and the embeddings."""
        extra = {
            k: self.source.get(self.prefix + k)
            for k in self.model.state_dict()
            if k.startswith("embeddings.") and self.prefix + k in self.source
        }
        if not self.has_pooler():
            return None, extra
        materialize(self.model.pooler, self.source, f"{self.prefix}pooler.")
        return PoolerStage(self.model.pooler, {"hidden_states": example}), extra


def _is_causal(config) -> bool:
    """The in-memory loader's rule (``ir.torch_io.load_hf_folder``): a causal LM where the
    config names a CausalLM architecture."""
    return any("CausalLM" in a for a in getattr(config, "architectures", None) or [])


def skeleton(folder: Path):
    """The HF model of ``folder`` on the meta device (no memory), its config and its family
    (``CausalLM`` or ``Encoder``, not yet bound to a source)."""
    try:
        import transformers
    except ImportError as e:
        raise UnsupportedError(
            "streaming an HF folder needs transformers: pip install 'effc[llm]'"
        ) from e
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: unreadable config.json ({e})") from e
    config._attn_implementation = "sdpa"  # causal attention without a mask tensor, as in memory
    config.use_cache = False
    causal = _is_causal(config)
    cls = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    with torch.device("meta"):
        model = cls.from_config(config, dtype=torch.float32)
    inner = getattr(model, "model", None)
    if (
        causal
        and inner is not None
        and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm"))
    ):
        return model.eval(), config, CausalLM
    encoder = getattr(model, "encoder", None)
    if not causal and hasattr(model, "embeddings") and hasattr(encoder, "layer"):
        return model.eval(), config, Encoder
    raise UnsupportedError(
        f"{folder}: streaming supports LLaMA-family causal LMs (model.embed_tokens, model.layers, "
        f"model.norm, lm_head) and BERT-family encoders (embeddings, encoder.layer); "
        f"{type(model).__name__} is compressed in memory"
    )


def memory(pid: int | str = "self") -> dict[str, int]:
    """RssAnon (anonymous memory: memory-mapped file pages excluded) and VmHWM (peak resident
    set) of a process in bytes, from /proc (zeros where there is none or it is gone)."""
    out = {"RssAnon": 0, "VmHWM": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _rss_anon() -> int:
    return memory()["RssAnon"]


@torch.no_grad()
def removal_scores(family, removal, first: list[tuple], seed: int) -> list[float]:
    """``remove-blocks``' score of every block, in a sweep over the original blocks before any
    is compressed: cosine (the mean over tokens of cos(input, output) of each block, on the first
    ``samples`` calibration inputs flowing through the original blocks, as the in-memory pass
    measures it) or random (the same seeded draw)."""
    o, blocks = removal.options, len(family.layers)
    if o.score == "random":
        return random_scores(blocks, seed)
    states, scores = list(first[: o.samples]), []
    progress, task = bar(blocks, "remove-blocks: cosine scores")
    with progress:
        for i in range(blocks):
            stage = family.block({i: i}, states[0])
            total, count = 0.0, 0
            for k, x in enumerate(states):
                y = stage(*x)
                a, b = token_cosines(x[0], y)
                total, count = total + a, count + b
                states[k] = (y, *x[1:])
            scores.append(total / count)
            release(family.layers[i])
            progress.advance(task)
    return scores


def _write_shard(path: Path, tensors: dict, bsr: dict, index: dict) -> None:
    meta = {"format": bsr_format.FORMAT, "version": str(bsr_format.VERSION)}
    for name, m in bsr.items():
        for key, t in m.tensors().items():
            tensors[f"{name}.{key}"] = t.contiguous()
        index["bsr"][name] = {
            "shard": path.name,
            "shape": list(m.shape),
            "group": m.group,
            "bits": m.bits,
        }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    index["weight_map"].update(dict.fromkeys(tensors, path.name))


def _pack(compression, stage_module: nn.Module, dtype: torch.dtype):
    """(dense tensors in ``dtype``, BSR matrices) of a compressed stage: every quantized linear
    (4 or 8 bits) as BSR, the rest dense (pruned-only weights with their zeros)."""

    bsr, dense = {}, {}
    for fqn, state in compression.quantized().items():
        if state.bits in (4, 8) and isinstance(stage_module.get_submodule(fqn), nn.Linear):
            bsr[fqn] = matrix_from_state(state)
    for name, t in [*stage_module.named_parameters(), *stage_module.named_buffers()]:
        if name.removesuffix(".weight") in bsr and name.endswith(".weight"):
            continue
        if name.split(".")[-1] in ("inv_freq", "original_inv_freq"):
            continue
        dense[name] = t.detach().to(dtype)
    return dense, bsr


def fingerprint(folder: Path) -> str:
    """A cheap identity of an HF folder's weights and config: every file's name, size and
    modification time and each safetensors header (the tensor names, shapes and offsets)."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".json", ".safetensors") or not path.is_file():
            continue
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with path.open("rb") as f:
            if path.suffix == ".safetensors":
                size = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(size, 1 << 26)))
            else:
                h.update(f.read())
    return h.hexdigest()


def work_folder(folder: Path, pipeline, out: Path, calibration: list[dict]) -> Path:
    """Where an interrupted run's finished stages wait: beside the output, keyed by the input,
    the pipeline text and the calibration data."""
    h = hashlib.sha256(fingerprint(folder).encode())
    h.update(pipeline.text.encode())
    for x in calibration:
        for k in sorted(x):
            h.update(k.encode())
            h.update(np.ascontiguousarray(x[k]).tobytes())
    return out.parent / f".{out.name}.work-{h.hexdigest()[:16]}"


def _save_state(work: Path, state: dict, streams: dict, spill: Spill | None = None) -> None:
    """Streams, then the state that names them, each written aside and renamed: a run killed at
    any point leaves the last complete stage's state. Spilled tensors are saved as their file
    names; files no stream refers to any more are then deleted."""
    names = spill.names if spill else {}
    saved = {str(j): [[names.get(id(t), t) for t in x] for x in v] for j, v in streams.items()}
    tmp = work / "streams.pt.tmp"
    torch.save(saved, tmp)
    os.replace(tmp, work / "streams.pt")
    (work / "state.json.tmp").write_text(json.dumps(state))
    os.replace(work / "state.json.tmp", work / "state.json")
    if names:  # something was spilled: drop the files the saved state no longer names
        spill.forget({t for v in saved.values() for x in v for t in x if isinstance(t, str)})


def _load_state(work: Path, spill: Spill) -> tuple[dict, dict] | None:
    try:
        state = json.loads((work / "state.json").read_text())
        raw = torch.load(work / "streams.pt", weights_only=True)
        streams = {
            int(j): [tuple(spill.get(t) if isinstance(t, str) else t for t in x) for x in v]
            for j, v in raw.items()
        }
    except (OSError, ValueError, RuntimeError, EOFError):
        return None
    return state, streams


def stream_compile(
    folder: str | Path,
    pipeline,
    out: str | Path,
    calibration: list[dict],
    force: bool = False,
    spill: bool | None = None,
    seed: int = 0,
) -> dict:
    """Compress the HF folder ``folder`` stage by stage with ``pipeline`` into the artifact
    folder ``out``; returns the report dict.

    ``spill``: keep the calibration streams on disk in the work folder (memory-mapped), not in
    memory; by default when they would take more than SPILL_FRACTION of the memory available.

    Finished stages go to a work folder beside ``out`` (``.NAME.work-KEY``: the shards, the
    calibration streams after the last finished stage, the index and records so far). A run that
    stops (killed, out of disk, an error) leaves it, and the same command continues after the last
    finished stage; the output folder is created only at the end, from a temporary folder renamed
    into place, and the work folder is then removed."""
    folder, out = Path(folder), Path(out)
    check_streamable(pipeline)
    prepare_output(out, force)
    if not calibration and any(p.needs_calibration() for p in pipeline.leaves()):
        raise InputError("this pipeline needs calibration inputs (--calib) and none were given")
    if not calibration:  # one window of token 0..15 to trace each stage with
        calibration = [{"input_ids": np.arange(16, dtype=np.int64)[None]}]
    model, config, kind = skeleton(folder)
    source = SafetensorsSource(folder)
    family = kind(model, source)
    dtype = source.dtype()
    layers = family.layers
    passes = pipeline.leaves()
    removal = passes[0] if getattr(passes[0], "name", "") == "remove-blocks" else None
    if removal is not None:
        passes = passes[1:]
        dropping = removal.count(len(layers))  # a one-line error before any work
    sharing = passes[0] if passes and getattr(passes[0], "name", "") == "share-blocks" else None
    if sharing is not None:  # applied to each group's blocks as they are read
        passes = passes[1:]
    reads, kept = _streams(passes)
    stages = [_one_pass(p) for p in passes]
    work = work_folder(folder, pipeline, out, calibration)
    work.mkdir(parents=True, exist_ok=True)
    spiller = Spill(work / "streams")
    resumed = _load_state(work, spiller)
    if resumed is not None:
        state, streams = resumed
        spill = state.get("spill", False)
    else:
        if spill is None:
            spill = should_spill(calibration, config.hidden_size, len(kept))
        t0 = time.perf_counter()
        first = family.first_inputs(calibration)
        records = [
            {
                "stage": "embeddings",
                "seconds": round(time.perf_counter() - t0, 2),
                "rss_anon": _rss_anon(),
            }
        ]
        removed = []
        if removal is not None:  # a sweep over the original blocks scores them first
            t0 = time.perf_counter()
            scores = removal_scores(family, removal, first, seed)
            removed = sorted(chosen(removal.options.score, scores, dropping))
            records.append(
                {
                    "stage": "remove-blocks",
                    "seconds": round(time.perf_counter() - t0, 2),
                    "rss_anon": _rss_anon(),
                    "removed": removed,
                    "scores": [round(x, 6) for x in scores],
                }
            )
        if spill:
            first = [(spiller.put(f"embeddings-{k}", x[0]), *x[1:]) for k, x in enumerate(first)]
        streams = dict.fromkeys(kept, first)
        index = {
            "metadata": {"format": "effc-bsr-stream", "family": family.kind},
            "weight_map": {},
            "bsr": {},
        }
        state = {"done": 0, "index": index, "records": records, "removed": removed}
        state["spill"] = spill
        _save_state(work, state, streams, spiller)
    index, records, start = state["index"], state["records"], state["done"]
    order = [i for i in range(len(layers)) if i not in set(state["removed"])]
    renumber_config(config, len(layers), order)
    # one stage per output block, or per group of blocks sharing weights
    groups = groups_of(len(order), sharing.options.group if sharing else 1)
    n = len(groups) + 1
    index["metadata"]["stages"] = n
    if start:
        records.append(
            {
                "stage": f"resumed after {start} of {n} stages",
                "seconds": 0.0,
                "rss_anon": _rss_anon(),
            }
        )
    progress, task = bar(n, "stream: blocks")
    with progress:
        progress.advance(task, start)
        for i in range(start, n):
            t0 = time.perf_counter()
            path = work / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            if i < len(groups):  # block order[j] of the source is block j of the output
                members = {j: order[j] for j in groups[i]}
                stage = family.block(members, streams[kept[-1]][0])
                share = None
                if sharing is not None and len(members) > 1:
                    share = (sharing, [layers[j] for j in members.values()])
                    first = _stage_name(family.container, groups[i][:1])
                    for j in groups[i][1:]:
                        index.setdefault("shared", {})[f"{family.container}.{j}"] = first
                streams = run_stage(
                    stage,
                    streams,
                    stages,
                    reads,
                    path,
                    dtype,
                    index,
                    records,
                    spill=spiller if spill else None,
                    share=share,
                )
                moved = any(j != k for j, k in members.items())
                was = f" (was {', '.join(map(str, members.values()))})" if moved else ""
                records[-1]["stage"] = _stage_name(family.container, groups[i]) + was
                for k in members.values():
                    release(layers[k])
            else:
                heads = {j: [x[:1] for x in v] for j, v in streams.items()}
                stage, extra = family.head(heads[kept[-1]][0][0])
                if stage is None:  # nothing to compress after the blocks: the rest as it is
                    _write_shard(path, {k: v.to(dtype) for k, v in extra.items()}, {}, index)
                    records.append({"stage": "head", "rss_anon": _rss_anon()})
                else:
                    run_stage(stage, heads, stages, reads, path, dtype, index, records, extra)
                    records[-1]["stage"] = "head"
                    release(stage)
            records[-1]["seconds"] = round(time.perf_counter() - t0, 2)
            state["done"] = i + 1
            _save_state(work, state, streams, spiller)
            progress.advance(task)

    def build(tmp: Path) -> None:
        for shard in sorted(set(index["weight_map"].values())):
            os.link(work / shard, tmp / shard)
        config.save_pretrained(tmp)
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
        report = {"pipeline": pipeline.text, "stream": True, "spill": spill, "stages": records}
        (tmp / "report.json").write_text(json.dumps(report, indent=2))

    manifest = {
        "effc_version": __version__,
        "backend": NAME,
        "inputs": [vars(spec) for spec in StreamInputs().input_specs()],
        "pipeline": pipeline.text,
        "source": str(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_artifact(out, build, manifest, force=force)
    shutil.rmtree(work, ignore_errors=True)
    return {"pipeline": pipeline.text, "stream": True, "spill": spill, "stages": records}


def run_stage(
    stage, streams, stages, reads, path, dtype, index, records, extra=None, spill=None, share=None
) -> dict:
    """Compress one stage pass by pass, each pass calibrated on the stream it reads; write its
    shard; return every kept stream advanced through the stage (stream j through the stage as
    passes 1..j left it).

    ``share`` (the share-blocks pass, the stage's layers): the layers share their linear weights
    before any other pass, as share-blocks leaves them in memory; stream 0 then runs through the
    shared layers, and the verification compares with the layers as they were read.

    Verification streams too: on the first ``VERIFY_SAMPLES`` inputs of the compressed model's
    stream, the stage's output after the passes against the original stage's on the same inputs,
    as a relative squared error (``output_error`` in the stage's record). With ``spill`` (a
    Spill) each output goes to disk as it is made, so one is in memory at a time."""

    keys = list(stage.example_inputs())
    tag = stage.name.replace(".", "_")

    def advance(module, inputs, j):
        out = []
        with torch.no_grad():
            for k, x in enumerate(inputs):
                o = module(*x)
                out.append((spill.put(f"{tag}-{j}-{k}", o) if spill else o, *x[1:]))
        return out

    out, stats = {}, {}
    checked = streams[max(streams)][:VERIFY_SAMPLES]
    with torch.no_grad():
        reference = [stage(*x) for x in checked]
    if share is not None:
        sharing, layers = share
        t0 = time.perf_counter()
        drift = share_linears(layers, sharing.options.choose)
        stats[sharing.name] = {
            "blocks": len(layers),
            "weight_rel_change_mean": round(sum(drift) / max(len(drift), 1), 6),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    if 0 in streams:
        out[0] = advance(stage, streams[0], 0)
    model = as_model(stage)
    for k, (pipe, j) in enumerate(zip(stages, reads), 1):
        data = streams.get(j) or streams[max(streams)][:1]
        ctx = PassContext(
            calibration=[{n: v.numpy() for n, v in zip(keys, x)} for x in data],
            stage_block=stage.name,
        )
        result = pipe.run(model, ctx)
        model = result.model
        for r in result.report.records:
            stats[r.name] = {a: b for a, b in r.stats.items() if a != "per_layer"}
            stats[r.name]["seconds"] = round(r.seconds, 2)
        if k in streams:
            out[k] = advance(model.runner, streams[k], k)
    with torch.no_grad():
        got = [model.runner(*x) for x in checked]
    error = sum(float(((g - r).double() ** 2).sum()) for g, r in zip(got, reference)) / max(
        sum(float((r.double() ** 2).sum()) for r in reference), 1e-30
    )
    del got, reference
    dense, bsr = _pack(model.compression, stage, dtype)
    dense.update({k: v.to(dtype) for k, v in (extra or {}).items()})
    _write_shard(path, dense, bsr, index)
    records.append(
        {
            "rss_anon": _rss_anon(),
            "bsr_layers": len(bsr),
            "output_error": float(f"{error:.4g}"),
            "passes": stats,
        }
    )
    return out


# ---------------------------------------------------------------- loading
def load(out: str | Path, activations: str = "fp32") -> nn.Module:
    """The causal LM of a streamed artifact: dense tensors read memory-mapped from the shards,
    every BSR layer a ``BSRLinear`` (its packed arrays, not a dense weight)."""
    import transformers

    out = Path(out)
    try:
        index = json.loads((out / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{out}: not a streamed effc artifact ({e})") from e
    config = transformers.AutoConfig.from_pretrained(out)
    causal = index["metadata"].get("family", "causal-lm") == "causal-lm"
    with torch.device("meta"):
        if causal:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            pooled = any(k.startswith("pooler.") for k in index["weight_map"])  # BSR arrays too
            model = transformers.AutoModel.from_config(
                config, dtype=torch.float32, add_pooling_layer=pooled
            )
    handles = {
        s: safe_open(str(out / s), framework="pt") for s in set(index["weight_map"].values())
    }
    bsr_keys = {
        f"{n}.{k}" for n in index["bsr"] for k in ("indptr", "indices", "values", "scales", "zeros")
    }
    model.to_empty(device="cpu")
    if not causal:
        _cpu_embeddings(model)
    state = {}
    for name, shard in index["weight_map"].items():
        if name not in bsr_keys:
            state[name] = handles[shard].get_tensor(name).float()
    for name, info in index["bsr"].items():
        h = handles[info["shard"]]
        parts = {
            k: h.get_tensor(f"{name}.{k}")
            for k in ("indptr", "indices", "values", "scales", "zeros")
        }
        m = BSRMatrix(tuple(info["shape"]), info["group"], info["bits"], **parts)
        m.validate()
        linear = model.get_submodule(name)
        parent, _, leaf = name.rpartition(".")
        bias = None if linear.bias is None else state[f"{name}.bias"]
        setattr(
            model.get_submodule(parent) if parent else model, leaf, BSRLinear(m, bias, activations)
        )
    aliased = _share_loaded(model, index.get("shared", {}), state, activations)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in bsr_keys and not re.search(r"rotary_emb|inv_freq", k)]
    missing = [k for k in missing if k not in aliased]
    for alias, canonical in aliased.items():  # after loading: the canonical weights are real
        if canonical is None:
            continue
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(canonical))
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise InputError(f"{out}: tensors missing {missing[:3]} or unexpected {unexpected[:3]}")
    if causal:
        with torch.device("cpu"):
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        if config.tie_word_embeddings and not isinstance(model.lm_head, BSRLinear):
            model.tie_weights()
    return model.eval()


def _share_loaded(model, shared: dict[str, str], state: dict, activations: str) -> dict:
    """Blocks written sharing another's linear weights (share-blocks: {block: the block whose
    weights it reads}): each of their BSR layers reads the other block's packed arrays (one copy
    in memory) with its own bias; returns {name: the canonical weight it is} for each dense
    linear weight (to tie once the canonical weights are loaded) and {name: None} for the
    packed arrays the BSR readers share (nothing to load)."""
    aliased = {}
    for block, canonical in shared.items():
        for name, m in model.get_submodule(canonical).named_modules():
            if not isinstance(m, (BSRLinear, nn.Linear)):
                continue
            target = f"{block}.{name}"
            if isinstance(m, nn.Linear):
                aliased[f"{target}.weight"] = f"{canonical}.{name}.weight"
                continue
            own = model.get_submodule(target)
            bias = None if own.bias is None else state[f"{target}.bias"]
            parent, _, leaf = target.rpartition(".")
            reader = BSRLinear(m.matrix, bias, activations)
            setattr(model.get_submodule(parent), leaf, reader)
            # its packed arrays are the canonical layer's: nothing of them to load
            aliased.update({f"{target}.{k}": None for k in reader.state_dict() if k != "bias"})
    return aliased


def run(out: str | Path, inputs: dict[str, np.ndarray], threads: int | None = None) -> dict:
    """``effc run`` on a streamed artifact: the logits for ``input_ids`` (a causal LM), or the
    last hidden state and pooled output (an encoder)."""
    if threads:
        torch.set_num_threads(threads)
    model = load(out)
    ids = torch.from_numpy(np.asarray(inputs["input_ids"], dtype=np.int64))
    vocab = model.config.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"input_ids must lie in [0, {vocab}) for this model")
    kwargs = {
        k: torch.from_numpy(np.asarray(inputs[k], dtype=np.int64))
        for k in ("attention_mask", "token_type_ids")
        if inputs.get(k) is not None
    }
    with torch.no_grad():
        if hasattr(model, "lm_head"):
            return {"logits": model(input_ids=ids, use_cache=False, **kwargs).logits.numpy()}
        result = model(input_ids=ids, **kwargs)
    outputs = {"last_hidden_state": result.last_hidden_state.numpy()}
    if getattr(result, "pooler_output", None) is not None:
        outputs["pooler_output"] = result.pooler_output.numpy()
    return outputs
