"""linf_255: exact on the 1/255 grid, symmetric, and refuses uint8 (eval item 6, api item 11)."""

import pytest
import torch

from mimicshield.metrics import linf_255


def test_linf_255_of_8_over_255_is_exactly_8():
    a = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.9
    b = a + 8 / 255
    b[:, :, ::2] = a[:, :, ::2] - 8 / 255
    want = ((a.double() - b.double()).abs().amax(dim=(1, 2, 3)) * 255).round()
    assert want.tolist() == [8.0, 8.0]
    assert [float(v) for v in linf_255(a, b)] == [8.0, 8.0]
    assert [float(v) for v in linf_255(b, a)] == [8.0, 8.0]


def test_linf_255_refuses_uint8():
    a = torch.full((1, 3, 16, 16), 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="divide by 255"):
        linf_255(a, a + 2)
