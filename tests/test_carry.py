"""Training across segments (truncated BPTT): a TTT block that carries its fast weights and q/k
conv history from one training forward to the next computes exactly the one-shot forward over
the joined segments, rows marked fresh start from W0, and no gradient crosses a segment."""

import pytest
import torch

from moshi_ttt.block import CarriedState, TTTBlock
from moshi_ttt.config import TTTConfig
from moshi_ttt.model import build_ttt_lm, carry_fast_weights, ttt_blocks


def _block(**over) -> TTTBlock:
    torch.manual_seed(0)
    cfg = TTTConfig(layers=[0], num_heads=2, **over)
    blk = TTTBlock(32, 2, cfg)
    with torch.no_grad():  # a trained-looking conv: every tap reads its frame
        for conv in (blk.conv_q, blk.conv_k):
            if conv is not None:
                conv.conv.conv.weight.normal_(0.0, 0.5)
    return blk


def _carry(blk: TTTBlock, fresh: list[bool]) -> None:
    """What `carry_fast_weights` does to each block of a model, for one bare block."""
    if blk.carry is None:
        blk.carry = CarriedState(fresh=torch.tensor(fresh))
    else:
        blk.carry.fresh = torch.tensor(fresh)


@pytest.mark.parametrize("over", [{}, {"qk_conv": 0}, {"forget": "none"},
                                  {"forget": "weight_norm"}, {"share_qk": True}])
def test_carried_segments_equal_the_joined_sequence(over):
    blk = _block(**over)
    K = blk.mini_batch_size
    x = torch.randn(3, 4 * K, 32)
    with torch.no_grad():
        full = blk(x)
        _carry(blk, [True] * 3)
        parts = [blk(x[:, :K])]
        for lo, hi in ((K, 3 * K), (3 * K, 4 * K)):
            _carry(blk, [False] * 3)
            parts.append(blk(x[:, lo:hi]))
    assert (torch.cat(parts, dim=1) - full).abs().max() <= 1e-5


def test_fresh_rows_start_from_w0_and_others_continue():
    blk = _block()
    K = blk.mini_batch_size
    x = torch.randn(2, 2 * K, 32)
    with torch.no_grad():
        _carry(blk, [True, True])
        blk(x[:, :K])
        _carry(blk, [True, False])  # row 0 starts a new stream, row 1 continues
        second = blk(x[:, K:])
        blk.carry = None
        alone = blk(x[:, K:])  # a plain forward: every row from W0, no conv history
        joined = blk(x)[:, K:]
    assert torch.equal(second[0], alone[0])
    assert (second[1] - joined[1]).abs().max() <= 1e-5
    assert (second[1] - alone[1]).abs().max() > 1e-3  # the carried row did read its past


def test_gradients_stay_inside_a_segment_and_reach_w0_through_fresh_rows_only():
    blk = _block()
    K = blk.mini_batch_size
    x = torch.randn(2, 2 * K, 32)
    _carry(blk, [True, True])
    blk(x[:, :K]).sum().backward()
    blk.zero_grad(set_to_none=True)
    _carry(blk, [False, False])
    assert all(not t.requires_grad for t in blk.carry.w.as_tuple())
    blk(x[:, K:]).sum().backward()  # would fail if the graph of segment 1 were still attached
    # nothing fresh: W0's gradient comes only through the decay toward it (a factor d ~ 1e-3)
    carried = blk.inner.w2.grad.norm()
    blk.zero_grad(set_to_none=True)
    _carry(blk, [True, False])
    blk(x[:, K:]).sum().backward()
    assert blk.inner.w2.grad.norm() > 100 * carried


def test_carrying_needs_whole_mini_batches():
    blk = _block()
    _carry(blk, [True])
    with pytest.raises(ValueError, match="whole mini-batches"):
        blk(torch.randn(1, blk.mini_batch_size + 3, 32))
    _carry(blk, [True, False])
    with pytest.raises(ValueError, match="fresh mask"):
        blk(torch.randn(1, blk.mini_batch_size, 32))


def test_carry_fast_weights_sets_and_drops_every_block(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg)
    blocks = [a.block for a in ttt_blocks(lm)]
    assert blocks and all(b.carry is None for b in blocks)
    carry_fast_weights(lm, torch.tensor([True, False]))
    assert all(b.carry is not None and b.carry.fresh.tolist() == [True, False] for b in blocks)
    carry_fast_weights(lm, None)
    assert all(b.carry is None for b in blocks)
