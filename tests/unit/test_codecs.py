"""Wire codecs: per-row bf16 / fp8, and the centred forms that send each segment's mean once."""
import pytest
import torch

from megatron_lsh.moe.compressors.codecs import CODECS
from megatron_lsh.parallel.all_to_all import wire_rows

SEGMENTS = [3, 0, 5, 1, 0]


def _rows_with_common_component(segments, hidden=32, spread=0.05, seed=0):
    """Rows of each segment = a large shared mean + small token-specific deviations."""
    gen = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(len(segments), hidden, generator=gen)
    segment_of_row = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(segments))
    deviations = spread * torch.randn(int(sum(segments)), hidden, generator=gen)
    return means[segment_of_row] + deviations, deviations, segment_of_row


@pytest.mark.parametrize("name", ["bf16-centered", "fp8-centered"])
def test_centered_codec_sends_two_header_rows_per_nonempty_segment(name):
    codec = CODECS[name]()
    x, _, _ = _rows_with_common_component(SEGMENTS)
    wire = codec.encode(x, SEGMENTS)
    assert wire.shape[0] == wire_rows(codec, SEGMENTS) == 9 + 2 * 3
    assert codec.decode(wire, SEGMENTS, torch.float64).dtype == torch.float64
    empty = codec.encode(x[:0], [0, 0])
    assert empty.shape[0] == 0 and codec.decode(empty, [0, 0], torch.float32).shape == (0, 32)


@pytest.mark.parametrize("inner", ["bf16", "fp8"])
def test_centering_keeps_the_token_specific_part_that_per_row_rounding_loses(inner):
    x, deviations, segment_of_row = _rows_with_common_component(SEGMENTS)
    plain, centered = CODECS[inner](), CODECS[f"{inner}-centered"]()
    err_plain = plain.decode(plain.encode(x, SEGMENTS), SEGMENTS, torch.float32) - x
    err_centered = centered.decode(centered.encode(x, SEGMENTS), SEGMENTS, torch.float32) - x
    # Error relative to what tells the rows of a segment apart (their deviations from the mean):
    # the per-row format rounds relative to the whole row (mean included).
    rel_plain = err_plain.norm() / deviations.norm()
    rel_centered = err_centered.norm() / deviations.norm()
    assert rel_centered < rel_plain / 10, (rel_plain, rel_centered)
    assert rel_centered < {"bf16": 0.02, "fp8": 0.1}[inner]


def test_the_mean_travels_at_about_twice_the_inner_precision():
    """Identical rows: the deviations are exactly zero, all error is the mean's (hi + lo)."""
    row = 3.0 * torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    x = row.repeat(6, 1)
    for name, plain_floor, centered_ceiling in (("fp8", 1e-2, 2e-3), ("bf16", 1e-4, 1e-5)):
        plain, centered = CODECS[name](), CODECS[f"{name}-centered"]()
        err_plain = (plain.decode(plain.encode(x, [6]), [6], torch.float32) - x).abs().max()
        err_centered = (centered.decode(centered.encode(x, [6]), [6], torch.float32)
                        - x).abs().max()
        amax = x.abs().max()
        assert err_plain > plain_floor * amax and err_centered < centered_ceiling * amax, name


def test_per_row_codecs_ignore_segments_and_send_no_headers():
    x, _, _ = _rows_with_common_component(SEGMENTS)
    for name in ("bf16", "fp8"):
        codec = CODECS[name]()
        assert codec.encode(x, SEGMENTS).shape[0] == wire_rows(codec, SEGMENTS) == x.shape[0]
        assert torch.equal(codec.decode(codec.encode(x, SEGMENTS), SEGMENTS, torch.float32),
                           codec.decode(codec.encode(x), (), torch.float32))
    assert wire_rows(None, SEGMENTS) == x.shape[0]
