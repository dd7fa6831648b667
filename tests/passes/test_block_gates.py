"""block-gates on an HF LLaMA (FX): weights stay frozen and unchanged, gates land in [0, 1] in
the compression state, a block that does nothing gets the lowest gate and remove-blocks{score=gates}
removes by them; the sampled gates find a pair of blocks that can only go together (which
one-at-a-time scores miss); the scale form's budget pulls the gate mass to the kept fraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_remove_blocks import _calib, _config, _llama

import effc
from effc.errors import PassOptionError, UnsupportedError
from effc.passes._train import output_distance
from effc.passes.block_gates import chunked, polish, put_lowest

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("method", ["sampled", "scale"])
def test_gates_rank_an_idle_block_weakest_and_weights_stay(method):
    """Distilling from the ungated model (random weights make next-token loss meaningless)."""
    model = _llama(idle=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = effc.Pipeline.from_text(
        f"block-gates{{method={method},steps=40,lr=0.05,rate=0.25,loss=kd,init=uniform}},"
        "remove-blocks{count=1,score=gates}"
    ).run(model, effc.PassContext(calibration=_calib(4)))
    gates_stats, removal = (r.stats for r in result.report.records)
    gates = gates_stats["gates"]
    assert all(0.0 <= g <= 1.0 for g in gates)
    assert gates_stats["ranking_weakest_first"][0] == 1, gates
    assert removal["removed"] == [1]
    if method == "scale":
        assert abs(sum(gates) / 4 - 0.75) < 0.15  # the budget term: mass of the kept blocks
    else:  # each draw removed round(0.25 * 4) = 1 block; the draws got closer to the original
        assert gates_stats["count"] == 1 and gates_stats["draws"] == 4
        assert gates_stats["log_cost_last"] < gates_stats["log_cost_first"]
    assert gates_stats["steps"] == 40 and gates_stats["seconds"] > 0
    # weights untouched (the gates are not applied); the removed block's are gone
    after = model.state_dict()
    assert torch.equal(
        after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        after["model.layers.1.mlp.up_proj.weight"], before["model.layers.2.mlp.up_proj.weight"]
    )
    assert all(
        p.requires_grad == q.requires_grad
        for p, q in zip(model.parameters(), _llama().parameters())
    )


def _cancelling_pair():
    """Six blocks: 2 and 3 cancel (3 is 2 with its output projections negated), so skipping
    either alone moves the output more than skipping 4 or 5 (scaled down), but skipping both
    moves it less than skipping 4 and 5 together."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config(6)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else None
    layers = model.model.layers
    with torch.no_grad():
        layers[3].load_state_dict(layers[2].state_dict())
        for i, scale in ((2, 0.4), (3, -0.4), (4, 0.3), (5, 0.3)):
            layers[i].self_attn.o_proj.weight.mul_(scale)
            layers[i].mlp.down_proj.weight.mul_(scale)
    return model


def test_sampled_gates_find_the_pair_that_only_goes_together():
    """Every draw removes two blocks together, so the gates learn what removing a pair does:
    they choose the cancelling pair, whose removal moves the output the least, where cosine and
    greedy (one block at a time) choose 4 and 5."""
    calib = _calib(4)
    reference = _cancelling_pair()
    x = {k: torch.as_tensor(v) for k, v in calib[0].items()}
    with torch.no_grad():
        want = reference(**x)
    moved = {}
    for score in ("cosine", "greedy", "gates"):
        model = _cancelling_pair()
        gates = "block-gates{count=2,steps=40}," if score == "gates" else ""
        result = effc.Pipeline.from_text(f"{gates}remove-blocks{{count=2,score={score}}}").run(
            model, effc.PassContext(calibration=calib)
        )
        removed = tuple(result.report.records[-1].stats["removed"])
        with torch.no_grad():
            moved[score] = (removed, float(output_distance(model(**x), want)))
    assert moved["cosine"][0] == moved["greedy"][0] == (4, 5), moved
    assert moved["gates"][0] == (2, 3), moved
    assert moved["gates"][1] < 0.5 * moved["cosine"][1], moved


@pytest.mark.parametrize(
    "text",
    [
        "block-gates{rate=1.5}",
        "block-gates{draws=1}",
        "block-gates{count=4}",
        "block-gates{seq=-1}",
        "block-gates{polish=-1}",
        "block-gates{near=0}",
        "block-gates{probe=-1}",
        "block-gates{probe=4,candidates=1}",
        "block-gates{method=scale,probe=4}",
    ],
)
def test_bad_options_are_one_line_errors(text):
    with pytest.raises(PassOptionError):
        effc.Pipeline.from_text(text).run(_llama(), effc.PassContext(calibration=_calib()))


def test_chunks_cut_every_array_alike():
    data = [{"input_ids": np.arange(10)[None], "attention_mask": np.ones((1, 10), np.int64)}]
    chunks = chunked(data, 4)
    assert [c["input_ids"].tolist() for c in chunks] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert all(c["attention_mask"].shape == (1, 4) for c in chunks)
    assert chunked(data, 0) == data and chunked(data, 10) == data


@pytest.mark.parametrize("method", ["sampled", "scale"])
def test_lm_loss_trains_on_the_text(method):
    result = effc.Pipeline.from_text(f"block-gates{{method={method},steps=8,loss=lm}}").run(
        _llama(), effc.PassContext(calibration=_calib(2))
    )
    stats = result.report.records[0].stats
    assert stats["loss"] == "lm" and len(stats["gates"]) == 4
    if method == "scale":
        assert stats["lm_loss_first"] > 0
    gates = result.model.compression.blocks
    assert [round(gates[f"model.layers.{i}"].gate, 4) for i in range(4)] == stats["gates"]


def test_an_encoder_trains_its_gates_on_its_output_hidden_states():
    """BERT has no next-token logits: loss=auto distils the output hidden states (the gates
    move and the distance they add is reported); loss=lm is a one-line error."""
    from test_remove_blocks import _bert

    for method in ("sampled", "scale"):
        result = effc.Pipeline.from_text(f"block-gates{{method={method},steps=12,rate=0.25}}").run(
            _bert(), effc.PassContext(calibration=_calib(seq=12))
        )
        stats = result.report.records[0].stats
        assert stats["loss"] == "kd" and len(stats["gates"]) == 4
        assert all(0.0 <= g <= 1.0 for g in stats["gates"]) and min(stats["gates"]) < 1.0
        first, last = (
            (stats["kd_loss_first"], stats["kd_loss_last"])
            if method == "scale"
            else (np.exp(stats["log_cost_first"]), np.exp(stats["log_cost_last"]))
        )
        assert first >= 0 and np.isfinite(last)
    with pytest.raises(UnsupportedError, match="loss=kd"):
        effc.Pipeline.from_text("block-gates{steps=2,loss=lm}").run(
            _bert(), effc.PassContext(calibration=_calib(seq=12))
        )


def test_polish_takes_the_best_swap_at_the_boundary_and_stops():
    """Additive costs per block, a deliberately wrong ranking: the first round trades block 0 for
    block 3 (of the two nearest, 2 and 3), the second finds no trade that lowers the cost; block 5,
    the best of all, is beyond ``near`` and stays out."""
    costs = [5.0, 1.0, 4.0, 2.0, 3.0, 0.0]
    seen = []

    def cost(removed):
        seen.append(removed)
        return sum(costs[i] for i in removed)

    chosen, stats = polish(cost, [0, 1, 2, 3, 4, 5], count=2, near=2, rounds=3)
    assert chosen == [1, 3]
    assert stats["polish_log_cost_start"] == 6.0 and stats["polish_log_cost"] == 3.0
    assert stats["polish_swaps"] == [{"out": 0, "in": 3, "log_cost": 3.0}]
    assert stats["polish_sets_measured"] == len(seen) == 1 + 4 + 4
    assert polish(cost, [0, 1, 2, 3, 4, 5], 2, 2, 0)[0] == [0, 1]  # no rounds: the gates' choice


def test_put_lowest_ranks_the_chosen_blocks_weakest():
    theta = torch.tensor([0.5, -1.0, 2.0, 0.1])
    out = put_lowest(theta, [1, 2])
    assert sorted(range(4), key=lambda i: float(out[i]))[:2] == [1, 2]
    assert abs(float(out[2]) - (0.1 - 1e-3)) < 1e-6  # just below the lowest kept block
    assert out[1] == -1.0 and out[0] == 0.5 and out[3] == 0.1  # nothing else moves
    assert torch.equal(put_lowest(theta, [1, 3]), theta)  # already lowest


def test_polish_finds_the_idle_block_the_untrained_gates_miss():
    """A step too small to move a float32 logit leaves the gates level (ties go by index, so
    block 0 starts chosen); one round of polish over the three others measures each and removes
    the idle block."""
    model = _llama(idle=1)
    result = effc.Pipeline.from_text(
        "block-gates{steps=1,lr=1e-50,count=1,init=uniform,loss=kd,polish=1,near=3},"
        "remove-blocks{count=1,score=gates}"
    ).run(model, effc.PassContext(calibration=_calib(4)))
    stats, removal = (r.stats for r in result.report.records)
    assert stats["gates_learned"] == [0.5] * 4
    assert stats["polish_swaps"] == [
        {"out": 0, "in": 1, "log_cost": round(stats["polish_log_cost"], 4)}
    ]
    assert stats["polish_log_cost"] < stats["polish_log_cost_start"]
    assert stats["chosen"] == [1] and removal["removed"] == [1]
    assert stats["polish_sets_measured"] == 4 and stats["polish_seconds"] > 0


def test_probe_cures_each_candidate_briefly_chooses_the_best_and_leaves_the_weights():
    """probe=S: the best sets polish measured each get S steps of a short cure; the one that
    costs least after it is chosen (and removed), and every weight is back as it was."""
    model = _cancelling_pair()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    result = effc.Pipeline.from_text(
        "block-gates{count=2,steps=10,polish=1,probe=4,candidates=3}"
    ).run(model, effc.PassContext(calibration=_calib(4)))
    stats = result.report.records[0].stats
    probed = stats["probed"]
    assert len(probed) == 3 and stats["probe_steps"] == 4 and stats["probe_seconds"] > 0
    # the candidates are the three cheapest sets measured, in order of their cost before the cure
    assert [p["log_cost"] for p in probed] == sorted(p["log_cost"] for p in probed)
    assert len({tuple(p["removed"]) for p in probed}) == 3
    assert stats["chosen"] == min(probed, key=lambda p: p["probed"])["removed"]
    assert any(p["probed"] < p["log_cost"] for p in probed)  # the short cure moved something
    ranking = stats["ranking_weakest_first"]
    assert sorted(ranking[:2]) == stats["chosen"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == grads
