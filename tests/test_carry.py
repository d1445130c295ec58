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
        blk.carry.advance(torch.tensor(fresh))


@pytest.mark.parametrize("over", [{}, {"qk_conv": 0}, {"qk_conv": 1}, {"forget": "none"},
                                  {"forget": "weight_norm"}, {"share_qk": True},
                                  {"rope": True}])
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


def test_gradients_stay_inside_a_segment_and_reach_w0_mostly_through_fresh_rows():
    blk = _block()
    K = blk.mini_batch_size
    x = torch.randn(2, 2 * K, 32)
    _carry(blk, [True, True])
    blk(x[:, :K]).sum().backward()
    blk.zero_grad(set_to_none=True)
    _carry(blk, [False, False])
    assert all(not t.requires_grad for t in blk.carry.w.as_tuple())
    assert all(not t.requires_grad for t in blk.carry.conv_tail)
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


def test_carry_fast_weights_sets_advances_and_drops_every_block(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg).train()
    blocks = [a.block for a in ttt_blocks(lm)]
    assert blocks and all(b.carry is None for b in blocks)
    carry_fast_weights(lm, torch.tensor([True, False]))
    assert all(b.carry is not None and b.carry.fresh.tolist() == [True, False] for b in blocks)
    K = tiny_cfg.ttt.mini_batch_size
    codes = torch.full((2, 17, K), -1, dtype=torch.long)
    codes[:, 0] = torch.randint(0, 1000, (2, K))
    with torch.no_grad():
        lm(codes)
    assert all(b.carry.w is None and b.carry.next_w is not None for b in blocks)
    carry_fast_weights(lm, torch.tensor([False, False]))
    assert all(b.carry.w is not None and b.carry.next_w is None for b in blocks)
    with pytest.raises(ValueError, match="bool"):
        carry_fast_weights(lm, torch.tensor([0, 1]))
    carry_fast_weights(lm, None)
    assert all(b.carry is None for b in blocks)


def test_a_recomputed_forward_starts_from_the_same_state():
    """Activation checkpointing runs a segment's forward again in the backward pass: it must
    read the segment's start state, not the state the first run ended with."""
    from torch.utils.checkpoint import checkpoint

    K = _block().mini_batch_size
    x = torch.randn(2, 2 * K, 32)
    grads = []
    for ckpt in (False, True):
        blk = _block()
        _carry(blk, [True, True])
        with torch.no_grad():
            blk(x[:, :K])
        _carry(blk, [False, False])
        y = checkpoint(blk, x[:, K:], use_reentrant=False) if ckpt else blk(x[:, K:])
        y.pow(2).sum().backward()
        grads.append(blk.wq.weight.grad.clone())
        end = blk.carry.next_w.w2.clone()
    assert (grads[0] - grads[1]).abs().max() <= 1e-5
    _carry(blk, [False, False])
    assert torch.equal(blk.carry.w.w2, end)


def test_eval_forwards_ignore_the_carried_state():
    blk = _block()
    K = blk.mini_batch_size
    x = torch.randn(1, K, 32)
    _carry(blk, [True])
    with torch.no_grad():
        blk(x)
        _carry(blk, [False])
        start, tail = blk.carry.w, blk.carry.conv_tail
        blk.eval()
        plain = blk(x)
        assert blk.carry.w is start and blk.carry.conv_tail is tail
        assert blk.carry.next_w is None and blk.carry.next_conv_tail is None  # nothing written
        carried, blk.carry = blk.carry, None
        assert torch.equal(plain, blk(x))  # from W0, as without carrying


def test_a_stream_keeps_its_rows():
    blk = _block()
    K = blk.mini_batch_size
    _carry(blk, [True, True])
    with torch.no_grad():
        blk(torch.randn(2, K, 32))
        _carry(blk, [False, False, False])
        with pytest.raises(ValueError, match="holds 2 rows, this segment has 3"):
            blk(torch.randn(3, K, 32))
    blk.carry.fresh = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="bool"):
        blk(torch.randn(2, K, 32))
