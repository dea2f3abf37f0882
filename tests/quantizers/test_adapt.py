"""adapt_to_shape on the layers that broke whole models: a 128 x 1 head and a 1 x 128 gate.

The conformance suite checks that every adapted quantizer fits; here: that these shapes really fail
unadapted, what the adaptation picks, and what the report's note says.
"""
import pytest
import torch

from compresskit.errors import CompressKitError
from compresskit.quantizers import PQ, RTN, VQ


def randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls", [PQ, VQ])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(128, 1), (1, 128)])
def test_tiny_layers_fail_as_asked_and_fit_after_adaptation(cls, bits, shape):
    q = cls(bits=bits)
    with pytest.raises(CompressKitError, match="subvectors per codebook"):
        q.fit(randn(*shape))
    adapted, note = q.adapt_to_shape(shape)
    assert adapted is not None and adapted is not q and note.startswith(("k lowered", "d lowered"))
    assert f"this {shape[0]}x{shape[1]} weight has" in note
    W = randn(*shape)
    assert adapted.fit(W).inverse_transform().shape == W.shape
    assert (adapted.k_ if cls is VQ else adapted.k) >= 2


def test_the_notes_name_what_changed_and_why():
    _, note = PQ(bits=4).adapt_to_shape((1, 128))
    assert note == "k lowered from 256 to 64: this 1x128 weight has only 64 subvectors per codebook"
    q, note = PQ(bits=2).adapt_to_shape((128, 1))  # d=4 would pad 1 column to 4: one subspace of 128 rows
    assert (q.d, q.k) == (1, 128)
    assert note == "d lowered from 4 to 1 and k from 256 to 128: this 128x1 weight has only 1 input column and only 128 subvectors per codebook"


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_vq_on_one_column_keeps_the_asked_bits(bits):
    """With k = 2 ** (bits * d), lowering d to the one column keeps bits per weight; lowering k alone would not."""
    q, note = VQ(bits=bits).adapt_to_shape((128, 1))
    assert q.fit(randn(128, 1)).code_bits_ == bits and "d lowered" in note
    assert q.size_report().parts_bits["codes"] == 128 * bits


def test_vq_row_groups_fall_to_a_divisor_of_the_rows():
    q, note = VQ(bits=2, d=2, k=4, row_groups=4).adapt_to_shape((6, 8))
    assert q.row_groups == 3 and note == "row_groups lowered from 4 to 3: this 6x8 weight has 6 rows, which 4 row groups do not divide"
    q.fit(randn(6, 8))


def test_a_single_subvector_stays_dense_and_fitting_shapes_are_left_alone():
    for q in (PQ(bits=2), VQ(bits=2)):
        adapted, reason = q.adapt_to_shape((1, 3))  # one subvector: nothing for k-means to do
        assert adapted is None and "stays dense" in reason
        assert q.adapt_to_shape((256, 64)) == (q, None)
    rtn = RTN(bits=2)
    assert rtn.adapt_to_shape((128, 1)) == (rtn, None)
    assert rtn.adapt_to_shape((7,)) == (None, "a 1-D tensor of shape (7,) has no [out, in] layout to quantize")


def test_invalid_parameters_still_raise():
    with pytest.raises(CompressKitError, match="bits"):
        PQ(bits=7).adapt_to_shape((128, 1))
