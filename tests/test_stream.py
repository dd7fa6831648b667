"""Streaming compression of an HF LLaMA folder block by block (effc.stream): the same weights as
the in-memory pipeline, a loadable sharded BSR artifact, and one-line refusals before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import effc

pytest.importorskip("transformers")  # HF folders: the llm extra

from _helpers import real_folder, token_calibration  # noqa: E402

from effc import stream  # noqa: E402
from effc.errors import InputError, PassOptionError, UnsupportedError  # noqa: E402
from effc.runtime.modules import BSRLinear  # noqa: E402
from tools.bench.scale import write_llama  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "m"
    write_llama(path, blocks=3, hidden=64, inter=160, heads=4, vocab=256, kv_heads=2)
    return path


def calibration(n=4, seed=0):
    return token_calibration(n, seq=32, seed=seed, mask=True)


def dense_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: (m.matrix.to_dense() if isinstance(m, BSRLinear) else m.weight.detach())
        for n, m in model.named_modules()
        if isinstance(m, (BSRLinear, torch.nn.Linear))
    }


@pytest.mark.parametrize(
    "text",
    [
        "quantize{bits=4,group=16,method=gptq,sequential=true}",
        # two passes, the first without sequential: each reads its own stream of hidden states
        "group-prune{sparsity=0.5,score=wanda},quantize{bits=4,group=16,method=gptq,sequential=true}",
        # BQPO trains block i on the trained blocks before it, against its own original
        "group-prune{sparsity=0.5},quantize{bits=4,group=16},gqsa-train{steps=4,samples=2}",
    ],
)
def test_streaming_gives_the_in_memory_weights(folder, tmp_path, text):
    calib = calibration()
    out = tmp_path / "out"
    report = stream.stream_compile(folder, effc.Pipeline.from_text(text), out, calib)
    assert [r["stage"] for r in report["stages"]] == [
        "embeddings",
        *(f"model.layers.{i}" for i in range(3)),
        "head",
    ]
    streamed = dense_weights(stream.load(out))
    memory = effc.Pipeline.from_text(text).run(str(folder), effc.PassContext(calibration=calib))
    quantized = memory.model.compression.quantized()
    assert len(quantized) == 3 * 7 + 1  # every linear, lm_head too
    for fqn, state in quantized.items():
        got = streamed[fqn]
        assert torch.equal(got, state.dequantized().reshape(got.shape)), fqn
    index = json.loads((out / stream.INDEX).read_text())
    assert len(index["bsr"]) == 22 and len(set(index["weight_map"].values())) == 4
    # verification streams: each stage's output against its original's on the same inputs
    errors = [r["output_error"] for r in report["stages"][1:]]
    assert len(errors) == 4 and all(0 < e < 0.5 for e in errors), errors
    if "gqsa-train" in text:  # one block per stage; the losses add up to the in-memory run's
        trained = [r["passes"]["gqsa-train"] for r in report["stages"][1:4]]
        assert all(t["blocks"] == 1 and t["tokens"] == 2 * 32 for t in trained)
        whole = memory.report.records[-1].stats
        assert sum(t["block_mse_after"] for t in trained) == pytest.approx(
            whole["block_mse_after"], rel=1e-6
        )


@pytest.mark.parametrize(
    "text",
    [
        "remove-blocks{count=1},quantize{bits=4,group=16,method=gptq,sequential=true}",
        "remove-blocks{count=2,score=random},group-prune{sparsity=0.5},quantize{bits=4,group=16}",
    ],
)
def test_streamed_block_removal_removes_and_compresses_as_in_memory(folder, tmp_path, text, cli):
    """remove-blocks streams as a first sweep over the original blocks (cosine scores on the
    calibration inputs, or the seeded random draw), then the kept blocks are compressed and
    renumbered: the same blocks go, with the same scores, and the rest get the in-memory weights."""
    calib = calibration()
    out = tmp_path / "out"
    report = stream.stream_compile(folder, effc.Pipeline.from_text(text), out, calib)
    memory = effc.Pipeline.from_text(text).run(str(folder), effc.PassContext(calibration=calib))
    want = memory.report.records[0].stats
    record = report["stages"][1]
    assert record["stage"] == "remove-blocks" and record["removed"] == want["removed"]
    assert record["scores"] == pytest.approx(want["scores"], rel=1e-5, abs=1e-6)
    kept = [i for i in range(3) if i not in want["removed"]]
    assert [r["stage"] for r in report["stages"][2:]] == [
        f"model.layers.{new}" + (f" (was {old})" if old != new else "")
        for new, old in enumerate(kept)
    ] + ["head"]
    loaded = stream.load(out)
    assert loaded.config.num_hidden_layers == len(kept) == len(loaded.model.layers)
    streamed = dense_weights(loaded)
    quantized = memory.model.compression.quantized()
    assert len(quantized) == 7 * len(kept) + 1
    for fqn, state in quantized.items():
        got = streamed[fqn]
        assert torch.equal(got, state.dequantized().reshape(got.shape)), fqn
    # the kept blocks' norms came from their original blocks, renumbered
    norm = f"model.layers.{len(kept) - 1}.input_layernorm.weight"
    want_norm = memory.model.module.get_submodule(norm.removesuffix(".weight")).weight
    assert torch.equal(dict(loaded.named_parameters())[norm], want_norm.detach())
    ids = torch.as_tensor(calib[0]["input_ids"])
    with torch.no_grad():
        logits = loaded(input_ids=ids, use_cache=False).logits
        ref = memory.model.module(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
    if "random" in text:  # no calibration needed: the CLI names the removed blocks
        cheap = "remove-blocks{count=2,score=random},quantize{bits=4,group=16}"
        args = ("compile", folder, "--passes", cheap, "--stream", "--target", "bsr")
        code, _, err = cli(*args, "-o", tmp_path / "cli")
        removed = ", ".join(map(str, want["removed"]))
        assert code == 0 and f"removed blocks {removed} of 3" in err, err


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A random BERT encoder folder (BertModel with a pooler, non-zero biases), as bf16 shards."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        architectures=["BertModel"],
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("bert") / "m"
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.mark.parametrize(
    "text",
    [
        "quantize{bits=4,group=16,method=gptq,sequential=true}",
        "remove-blocks{count=1},group-prune{sparsity=0.5,score=wanda},quantize{bits=4,group=16}",
    ],
)
def test_a_bert_encoder_streams_to_the_in_memory_weights(bert_folder, tmp_path, text, cli):
    """BERT-family folders stream too: the embeddings' output feeds encoder.layer.0, each layer
    is compressed as a stage of its own, the pooler is the last: every quantized layer (pooler
    included) equals the in-memory pipeline's, and the loaded artifact computes the compressed
    model's hidden states and pooled output."""
    calib = calibration()
    out = tmp_path / "out"
    report = stream.stream_compile(bert_folder, effc.Pipeline.from_text(text), out, calib)
    memory = effc.Pipeline.from_text(text).run(
        str(bert_folder), effc.PassContext(calibration=calib)
    )
    blocks = 2 if "remove-blocks" in text else 3
    stages = [r["stage"] for r in report["stages"]]
    assert (
        stages[0] == "embeddings"
        and stages[-1] == "head"
        and len(stages) == blocks + 2 + (blocks == 2)
    )
    assert all(s.startswith("encoder.layer.") for s in stages[1 + (blocks == 2) : -1])
    loaded = stream.load(out)
    streamed = dense_weights(loaded)
    quantized = memory.model.compression.quantized()
    assert len(quantized) == 6 * blocks + 1 and "pooler.dense" in quantized
    for fqn, state in quantized.items():
        got = streamed[fqn]
        assert torch.equal(got, state.dequantized().reshape(got.shape)), fqn
    ids = torch.as_tensor(calib[0]["input_ids"])
    with torch.no_grad():
        got, want = loaded(input_ids=ids), memory.model.module(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-4, atol=1e-4)
    # effc run on it: the hidden states and the pooled output
    np.savez(tmp_path / "in.npz", **calib[1])
    code, _, err = cli("run", out, "--inputs", tmp_path / "in.npz", "--out", tmp_path / "o.npz")
    assert code == 0, err
    saved = np.load(tmp_path / "o.npz")
    assert set(saved.files) == {"last_hidden_state", "pooler_output"}
    with torch.no_grad():
        ref = loaded(input_ids=torch.from_numpy(calib[1]["input_ids"])).last_hidden_state
    np.testing.assert_allclose(saved["last_hidden_state"], ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "family, text",
    [
        ("llama", "share-blocks{group=2},quantize{bits=4,group=16,method=gptq}"),
        (
            "llama",
            "remove-blocks{count=1},share-blocks{choose=mean},group-prune{sparsity=0.5,"
            "score=wanda},quantize{bits=4,group=16}",
        ),
        ("bert", "share-blocks{group=3},quantize{bits=4,group=16,method=gptq}"),
    ],
)
def test_shared_blocks_stream_as_one_stage_and_load_shared(
    folder, bert_folder, tmp_path, family, text
):
    """share-blocks streams: each group of blocks is one stage, shared as in memory before the
    other passes (GPTQ's Hessian of a shared weight sums over its blocks), so every quantized
    layer equals the in-memory pipeline's; the artifact holds each shared weight once, and the
    loaded blocks of a group read one packed copy, with their own biases and norms."""
    source = folder if family == "llama" else bert_folder
    calib = calibration()
    out = tmp_path / "out"
    report = stream.stream_compile(source, effc.Pipeline.from_text(text), out, calib)
    memory = effc.Pipeline.from_text(text).run(str(source), effc.PassContext(calibration=calib))
    container = "model.layers" if family == "llama" else "encoder.layer"
    groups = memory.report.records[-2 if "remove" not in text else -3].stats["groups"]
    shared_stages = [r for r in report["stages"] if "share-blocks" in r.get("passes", {})]
    assert [r["stage"].split(" ")[0] for r in shared_stages] == [
        f"{g[0]}-{g[-1].rpartition('.')[2]}" for g in groups
    ]
    index = json.loads((out / stream.INDEX).read_text())
    assert index["shared"] == {b: g[0] for g in groups for b in g[1:]}
    aliases = [b for g in groups for b in g[1:]]
    # a block reading another's weights keeps only its biases and norms in the shards
    own = [k for k in index["weight_map"] if k.startswith(tuple(f"{b}." for b in aliases))]
    assert own and all(k.endswith(".bias") or k.lower().endswith("norm.weight") for k in own)
    loaded = stream.load(out)
    streamed = dense_weights(loaded)
    quantized = memory.model.compression.quantized()
    per_block = 7 if family == "llama" else 6
    kept = len(loaded.model.layers if family == "llama" else loaded.encoder.layer)
    assert len(quantized) == per_block * (kept - len(aliases)) + 1 == len(index["bsr"])
    for fqn, state in quantized.items():
        got = streamed[fqn]
        assert torch.equal(got, state.dequantized().reshape(got.shape)), fqn
    modules = dict(loaded.named_modules())
    for g in groups:
        for b in g[1:]:
            for name, m in modules.items():
                if name.startswith(g[0] + ".") and isinstance(m, BSRLinear):
                    other = modules[b + name[len(g[0]) :]]
                    assert isinstance(other, BSRLinear)
                    for k, t in m.matrix.tensors().items():  # one packed copy in memory
                        assert getattr(other, k).data_ptr() == t.data_ptr()
                    if m.bias is not None:  # a BERT's biases stay per block
                        assert not torch.equal(other.bias, m.bias)
    ids = torch.as_tensor(calib[0]["input_ids"])
    with torch.no_grad():
        got, want = loaded(input_ids=ids), memory.model.module(input_ids=ids)
    key = "logits" if family == "llama" else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)
    assert container in report["stages"][-2]["stage"]


def test_shared_blocks_refusals_before_any_work(folder, tmp_path):
    """What share-blocks cannot stream with: a one-line error, no output."""
    cases = {
        "quantize{bits=4},share-blocks": "share-blocks' streams as the first pass",
        "share-blocks,quantize{bits=4,method=gptq,sequential=true}": "use sequential=false",
        "share-blocks,quantize{bits=4},gqsa-train": "BQPO trains a shared weight",
        "share-blocks{choose=fit}": "choose=fit .* does not stream",
    }
    for text, message in cases.items():
        with pytest.raises(UnsupportedError, match=message):
            stream.stream_compile(folder, effc.Pipeline.from_text(text), tmp_path / "o", [])
        assert not (tmp_path / "o").exists()


def test_loaded_artifact_runs_like_the_compressed_model(folder, tmp_path, cli):
    text = "group-prune{sparsity=0.5},quantize{bits=4,group=16}"
    calib = calibration(2)
    out = tmp_path / "out"
    stream.stream_compile(folder, effc.Pipeline.from_text(text), out, calib)
    model = stream.load(out)
    assert isinstance(model.model.layers[2].mlp.down_proj, BSRLinear)
    memory = effc.Pipeline.from_text(text).run(str(folder), effc.PassContext(calibration=calib))
    ids = torch.from_numpy(calib[0]["input_ids"])
    with torch.no_grad():
        want = memory.model.module(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the decode loop over the memory-mapped artifact: the greedy tokens of the model itself
    from effc.runtime.decode import StaticDecoder

    prompt = ids[:, :8]
    tokens = StaticDecoder(model, 32).generate(prompt, 8).tokens
    seq = torch.cat([prompt, torch.tensor([tokens])], 1)
    with torch.no_grad():
        logits = model(input_ids=seq).logits[0, 7:-1]  # the positions that chose each token
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    # each token is the model's argmax (random weights: near-ties only up to float order)
    assert (logits.max(-1).values - chosen).max() <= 1e-4 * logits.abs().max()
    # the artifact through the CLI: logits of the right shape
    np.savez(tmp_path / "in.npz", **calib[1])
    code, outp, _ = cli("run", out, "--inputs", tmp_path / "in.npz", "--out", tmp_path / "o.npz")
    assert code == 0
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(calib[1]["input_ids"])).logits
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["logits"], want.numpy(), rtol=1e-5)


def test_cli_streams_on_request_or_when_the_model_would_not_fit(folder, tmp_path, cli, monkeypatch):
    np.savez(
        tmp_path / "c.npz", **{k: np.stack([c[k] for c in calibration()]) for k in calibration()[0]}
    )
    passes = "quantize{bits=4,group=16,method=gptq}"
    out = tmp_path / "a"
    args = ("compile", folder, "--passes", passes, "--target", "bsr", "--calib", tmp_path / "c.npz")
    code, outp, err = cli(*args, "--stream", "-o", out)
    assert code == 0 and "head" in err and (out / stream.INDEX).is_file()  # the stage table
    assert stream.stream_reason(folder) is None  # a few MB fit
    monkeypatch.setattr(stream, "mem_available", lambda: 1 << 14)  # 16 KiB
    reason = stream.stream_reason(folder)
    assert "GiB is available" in reason and "2.5x its fp32 size" in reason
    code, _, err = cli(*args, "-o", tmp_path / "b")
    assert code == 0 and "streaming block by block" in err, err
    assert (tmp_path / "b" / stream.INDEX).is_file()
    # and its calibration streams would not fit either: they went to disk
    assert json.loads((tmp_path / "b" / "report.json").read_text())["spill"] is True
    assert "calibration streams were kept on disk" in " ".join(err.split())
    assert json.loads((out / "report.json").read_text())["spill"] is False


def test_refusals_come_before_any_work(folder, tmp_path, cli):
    out = tmp_path / "x"
    for text, what in (
        ("block-gates", "does not stream"),
        ("group-prune{scope=global}", "scope=global"),
        ("group-prune{allocate=sensitivity}", "allocate=sensitivity"),
        ("quantize,gqsa-train{stage=e2e}", "stage=e2e"),
        ("quantize,gqsa-train{target=model}", "target=model"),
        ("quantize,gqsa-train{tail=true}", "tail=true"),
        ("quantize,remove-blocks{count=1}", "first pass"),
        ("remove-blocks{count=1,score=gates}", "score=gates"),
        ("remove-blocks{count=1,score=greedy}", "score=greedy"),
    ):
        with pytest.raises(UnsupportedError, match=what):
            stream.stream_compile(folder, effc.Pipeline.from_text(text), out, calibration(1))
    with pytest.raises(InputError, match="calibration"):
        stream.stream_compile(folder, effc.Pipeline.from_text("quantize{method=gptq}"), out, [])
    with pytest.raises(PassOptionError, match="would remove 3 of 3 blocks"):
        stream.stream_compile(
            folder, effc.Pipeline.from_text("remove-blocks{count=3,score=random}"), out, []
        )
    code, _, err = cli("compile", folder, "--passes", "quantize", "--stream", "-o", out)
    assert code == 2 and "--target onnxruntime needs the whole model" in err
    code, _, err = cli(
        "compile",
        "builtin:tiny-cnn",
        "--passes",
        "quantize",
        "--stream",
        "--target",
        "bsr",
        "-o",
        out,
    )
    assert code == 2 and "not one" in err
    assert not out.exists()


def test_a_damaged_checkpoint_is_one_line_and_leaves_no_output(folder, tmp_path, cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    shard = bad / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    out = tmp_path / "o"
    code, _, err = cli(
        "compile", bad, "--passes", "quantize", "--target", "bsr", "--stream", "-o", out
    )
    assert code == 2 and "model-00002-of-00004.safetensors" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../escape.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="outside the model folder"):
        stream.SafetensorsSource(bad)


@pytest.mark.slow
def test_smollm2_streamed_and_in_memory_sequential_weights_are_identical(tmp_path):
    """The real SmolLM2-135M (tied embeddings: the head stage reads lm_head from the embedding
    table): 3 of its 30 blocks removed by cosine score, Wanda calibrated on the already pruned
    blocks, then W4: the same blocks removed and every one of the 190 layers left bit-identical
    to the in-memory pipeline's."""
    from transformers import AutoTokenizer

    from effc.models.real import smollm2_folder
    from tools.quality.data import split, windows

    folder = real_folder(smollm2_folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = [
        {"input_ids": w[None].numpy(), "attention_mask": np.ones((1, 64), dtype=np.int64)}
        for w in windows(tokenizer, split()[0], 2, 64)
    ]
    text = (
        "remove-blocks{count=3},group-prune{sparsity=0.5,score=wanda,sequential=true},"
        "quantize{bits=4,group=16}"
    )
    report = stream.stream_compile(folder, effc.Pipeline.from_text(text), tmp_path / "o", calib)
    streamed = dense_weights(stream.load(tmp_path / "o"))
    memory = effc.Pipeline.from_text(text).run(str(folder), effc.PassContext(calibration=calib))
    assert report["stages"][1]["removed"] == memory.report.records[0].stats["removed"]
    quantized = memory.model.compression.quantized()
    assert len(quantized) == 190 and "lm_head" in quantized
    for fqn, state in quantized.items():
        got = streamed[fqn]
        assert torch.equal(got, state.dequantized().reshape(got.shape)), fqn


@pytest.mark.slow
def test_real_minilm_streams_to_the_in_memory_weights(tmp_path):
    """The real all-MiniLM-L6-v2 folder (a sentence-transformers BertModel whose checkpoint also
    holds its int64 position ids): 1 of 6 blocks removed by cosine score and GPTQ W4 on the rest,
    streamed and in memory, give the same blocks and every quantized layer bit-identical."""
    from transformers import AutoTokenizer

    from effc.models.real import minilm_folder
    from tools.quality.norms import lee_inputs

    folder = real_folder(minilm_folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib = lee_inputs(tokenizer, 64, 4)[2]  # 4 windows of 64 tokens of the calibration text
    text = "remove-blocks{count=1},quantize{bits=4,group=16,method=gptq,sequential=true}"
    report = stream.stream_compile(folder, effc.Pipeline.from_text(text), tmp_path / "o", calib)
    memory = effc.Pipeline.from_text(text).run(str(folder), effc.PassContext(calibration=calib))
    assert report["stages"][1]["removed"] == memory.report.records[0].stats["removed"]
    loaded = stream.load(tmp_path / "o")
    streamed = dense_weights(loaded)
    quantized = memory.model.compression.quantized()
    assert len(quantized) == 5 * 6 + 1
    for fqn, state in quantized.items():
        assert torch.equal(streamed[fqn], state.dequantized().reshape(streamed[fqn].shape)), fqn
    ids = torch.as_tensor(calib[0]["input_ids"])
    with torch.no_grad():
        got, want = loaded(input_ids=ids), memory.model.module(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spill", [False, True])
def test_an_interrupted_run_resumes_after_its_last_finished_block(
    folder, tmp_path, monkeypatch, spill
):
    """Also with the calibration streams spilled to disk: the resumed run reads them back
    memory-mapped, and gives the weights of an uninterrupted run that kept them in memory."""
    text = "group-prune{sparsity=0.5,score=wanda},quantize{bits=4,group=16,method=gptq}"
    calib = calibration(2)
    fresh = tmp_path / "fresh"
    stream.stream_compile(folder, effc.Pipeline.from_text(text), fresh, calib, spill=False)
    assert not list(tmp_path.glob(".fresh.work-*"))  # removed after success

    real, calls = stream.run_stage, []

    def dies_on_the_third_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(stream, "run_stage", dies_on_the_third_block)
    with pytest.raises(KeyboardInterrupt):
        stream.stream_compile(folder, effc.Pipeline.from_text(text), out, calib, spill=spill)
    assert not out.exists()
    (work,) = tmp_path.glob(".out.work-*")
    state = json.loads((work / "state.json").read_text())
    assert state["done"] == 2 and state["spill"] is spill
    # spilled: the hidden states after block 1, one file per kept stream and sample, no others
    spilled = sorted(f.name for f in (work / "streams").glob("*")) if spill else []
    assert spilled == (
        [f"model_layers_1-{j}-{k}.npy" for j in (0, 1, 2) for k in (0, 1)] if spill else []
    )
    monkeypatch.setattr(stream, "run_stage", real)
    calls.clear()
    report = stream.stream_compile(folder, effc.Pipeline.from_text(text), out, calib)
    assert any(r["stage"] == "resumed after 2 of 4 stages" for r in report["stages"])
    assert report["spill"] is spill  # the resumed run keeps the interrupted one's choice
    assert not work.exists()
    want, got = dense_weights(stream.load(fresh)), dense_weights(stream.load(out))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # another pipeline (or other calibration data) is another work folder: nothing is mixed
    other = stream.work_folder(folder, effc.Pipeline.from_text("quantize"), out, calib)
    assert other != work and other != stream.work_folder(
        folder, effc.Pipeline.from_text(text), out, calibration(2, seed=1)
    )
