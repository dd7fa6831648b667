import pytest
import torch
from _helpers import random_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

from effc.errors import InputError
from effc.runtime import format as bsr


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 9),
    ngroups=st.integers(1, 6),
    group=st.sampled_from([16, 32]),
    bits=st.sampled_from([4, 8]),
    density=st.floats(0, 1),
    seed=st.integers(0, 1000),
)
def test_pack_then_dense_equals_the_quantized_weights(out, ngroups, group, bits, density, seed):
    m, (codes, scales, zeros, mask) = random_matrix(
        out, ngroups * group, group, bits, density, seed
    )
    expected = (
        (codes.float() - zeros.float()[..., None])
        * scales.half().float()[..., None]
        * mask[..., None]
    )
    torch.testing.assert_close(m.to_dense(), expected.reshape(out, -1), rtol=0, atol=0)
    assert m.nnzb == int(mask.sum())
    assert torch.equal(bsr.unpack_codes(bsr.pack_codes(codes, bits), bits), codes.reshape(-1))


def test_bytes_split_into_values_indices_scales():
    m, _ = random_matrix(out=4, inp=64, density=1.0)
    assert m.nbytes() == {"values": 16 * 8, "indices": 16 * 2 + 5 * 4, "scales": 16 * 3}


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda m: m.indptr.__setitem__(2, 100), "indptr"),
        (lambda m: m.indptr.__setitem__(1, -1), "indptr"),
        (
            lambda m: setattr(m, "indices", torch.full_like(m.indices, 60)),
            "block index is out of range",
        ),
        (lambda m: setattr(m, "values", m.values[:-1].clone()), "values must be"),
        (lambda m: setattr(m, "scales", m.scales.float()), "scales must be"),
        (lambda m: setattr(m, "zeros", torch.full_like(m.zeros, 200)), "zero point exceeds 15"),
        (lambda m: m.scales.__setitem__(0, float("inf")), "not finite"),
        (lambda m: setattr(m, "group", 12), "group must divide"),
        (
            lambda m: setattr(m, "indices", m.indices.int().flip(0).to(torch.uint16)),
            "ascend within each row",
        ),
    ],
)
def test_validate_rejects_inconsistent_matrices(corrupt, message):
    m, _ = random_matrix()
    corrupt(m)
    with pytest.raises(InputError, match=message):
        m.validate()


def test_save_load_round_trip_and_corrupt_files(tmp_path):
    m, _ = random_matrix()
    bsr.save({"layer.0": m}, tmp_path / "w.safetensors")
    (loaded,) = bsr.load(tmp_path / "w.safetensors").values()
    assert torch.equal(loaded.to_dense(), m.to_dense())
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(InputError):
        bsr.load(tmp_path / "bad.safetensors")
    m.indptr[3] = 1000
    bsr.save({"layer.0": m}, tmp_path / "inconsistent.safetensors")
    with pytest.raises(InputError, match="indptr"):
        bsr.load(tmp_path / "inconsistent.safetensors")


@pytest.mark.parametrize("bits", [4, 8])
def test_concat_rows_stacks_the_dense_weights(bits):
    parts = [
        random_matrix(out, 64, 16, bits, density, seed)[0]
        for out, density, seed in ((5, 0.5, 1), (3, 0.0, 2), (7, 1.0, 3))
    ]  # an empty and a full matrix among them
    stacked = bsr.concat_rows(parts)
    stacked.validate()
    assert stacked.shape == (15, 64) and stacked.nnzb == sum(p.nnzb for p in parts)
    assert torch.equal(stacked.to_dense(), torch.cat([p.to_dense() for p in parts]))


def test_concat_rows_rejects_mismatched_matrices():
    with pytest.raises(InputError, match="cannot stack"):
        bsr.concat_rows([random_matrix(4, 64, 16)[0], random_matrix(4, 64, 32)[0]])
    with pytest.raises(InputError, match="cannot stack"):
        bsr.concat_rows([random_matrix(4, 64, 16)[0], random_matrix(4, 32, 16)[0]])
