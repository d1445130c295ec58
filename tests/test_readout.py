"""`ttt.out_init: unembedding` (the tiny config's): each main-transformer TTT block's wo starts as
the least-squares map from what the block returns when it recalls a frame to the text head's row
for the token that frame read, so that from the first step a recall votes for what it recalls;
then it is rescaled as `matched`. Applied wherever the whitening is (`calibrate_ttt`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moshi_ttt.block import TTTBlock
from moshi_ttt.config import TTTConfig
from moshi_ttt.eval.diagnose import random_codes
from moshi_ttt.model import (
    block_inputs, build_ttt_lm, calibrate_ttt, delayed_inputs, readout_targets, ttt_blocks,
)
from moshi_ttt.ttt_mlp import head_layer_norm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, VOCAB = 32, 8


def _recalled(block: TTTBlock, x: torch.Tensor) -> torch.Tensor:
    """What the block adds (before its gate) when it recalls each frame of x exactly."""
    with torch.no_grad():
        _, xk, xv, _ = block._qkv_lr(x)
        z = xk + head_layer_norm(xv - xk, block.inner.ttt_norm_weight,
                                 block.inner.ttt_norm_bias, block.ln_eps)
        z = z.transpose(1, 2).reshape(*x.shape[:2], block.d_model)
        return block.wo(block.post_norm(z))


def _token_frames(n: int = 600, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames [1, n, D] that carry one of VOCAB tokens each (a shared direction, the token's
    embedding, noise), the tokens [1, n], and a unit 'text head' row per token [VOCAB, D]."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(VOCAB, D, generator=g)
    head = F.normalize(torch.randn(VOCAB, D, generator=g), dim=-1)
    tok = torch.randint(0, VOCAB, (1, n), generator=g)
    x = 4.0 + emb[tok] + 0.1 * torch.randn(1, n, D, generator=g)
    return x, tok, head


def _block() -> TTTBlock:
    """Without q/k convs, so that a frame's key is its own whatever frames surround it."""
    torch.manual_seed(0)
    blk = TTTBlock(D, 2, TTTConfig(layers=[0], qkv_init="whitened", out_init="unembedding",
                                   qk_conv=0))
    blk.eval()
    return blk


def test_a_recalled_frame_votes_for_the_token_it_read():
    x, tok, head = _token_frames()
    blk = _block()
    blk.whiten_projections(x)
    before = (_recalled(blk, x) @ head.T).argmax(-1)
    resid = blk.fit_readout(x, head[tok], torch.ones_like(tok, dtype=torch.bool))
    recalled = _recalled(blk, x)
    votes = (recalled @ head.T).argmax(-1)
    assert float((before == tok).float().mean()) < 0.5  # the random read-out's, for contrast
    assert float((votes == tok).float().mean()) == 1.0
    # the residual it reports is the fit's: ||rows - read-out||^2 / ||rows||^2
    direct = float((head[tok] - recalled).pow(2).sum() / head[tok].pow(2).sum())
    assert resid == pytest.approx(direct, rel=1e-4, abs=1e-6)
    assert resid < 0.2, resid
    # the scale is match_output_scale's to set: only the direction is fitted
    f = blk.match_output_scale(x)
    assert f > 0 and bool(((_recalled(blk, x) @ head.T).argmax(-1) == tok).all())


def test_frames_left_out_do_not_count():
    """Only the kept frames enter the fit: the others may hold anything, even NaN."""
    x, tok, head = _token_frames()
    keep = torch.rand(tok.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    targets = head[tok].clone()
    targets[~keep] = float("nan")
    a, b = _block(), _block()
    for blk in (a, b):
        blk.whiten_projections(x)
    ra = a.fit_readout([x], [targets], [keep])
    rb = b.fit_readout([x[keep][None]], [head[tok][keep][None]], [keep[keep][None]])
    torch.testing.assert_close(a.wo.weight, b.wo.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.wo.bias, b.wo.bias, rtol=1e-5, atol=1e-6)
    assert ra == pytest.approx(rb, rel=1e-6)


def test_a_fit_over_several_batches_is_the_fit_over_their_frames():
    x, tok, head = _token_frames()
    one, parts = _block(), _block()
    for blk in (one, parts):
        blk.whiten_projections(x)
    all_kept = torch.ones_like(tok, dtype=torch.bool)
    r1 = one.fit_readout([x], [head[tok]], [all_kept])
    cut = [0, 100, 350, x.shape[1]]
    r2 = parts.fit_readout([x[:, a:b] for a, b in zip(cut, cut[1:])],
                           [head[tok[:, a:b]] for a, b in zip(cut, cut[1:])],
                           [all_kept[:, a:b] for a, b in zip(cut, cut[1:])])
    torch.testing.assert_close(one.wo.weight, parts.wo.weight, rtol=1e-5, atol=1e-6)
    assert r1 == pytest.approx(r2, rel=1e-6)


@pytest.mark.parametrize("case, message", [
    ("none kept", r"at least 2 calibration frames that read a text token \(not padding\), got 0"),
    ("nan", r"read-out fit hold NaN or inf"),
    ("shape", r"read-out targets \(1, 600, 31\) and mask \(1, 600\) \(torch.bool\) do not "
              r"match the block's input \(1, 600, 32\)"),
])
def test_the_fit_refuses_what_it_cannot_use(case, message):
    x, tok, head = _token_frames()
    blk = _block()
    blk.whiten_projections(x)
    targets, keep = head[tok], torch.ones_like(tok, dtype=torch.bool)
    if case == "none kept":
        keep = torch.zeros_like(keep)
    elif case == "nan":
        targets = targets.clone()
        targets[0, 5] = float("nan")
    else:
        targets = targets[..., :-1]
    before = (blk.wo.weight.clone(), blk.wo.bias.clone())
    with pytest.raises(ValueError, match=message):
        blk.fit_readout([x], [targets], [keep])
    assert torch.equal(blk.wo.weight, before[0]) and torch.equal(blk.wo.bias, before[1])


def test_the_fit_refuses_a_streaming_block():
    """Its projections would advance the conv state of a live session."""
    x, tok, head = _token_frames()
    blk = _block()
    with blk.streaming(1), pytest.raises(RuntimeError, match=r"outside streaming"):
        blk.fit_readout(x, head[tok], torch.ones_like(tok, dtype=torch.bool))


def test_readout_targets_are_the_head_rows_of_real_text_tokens(tiny_cfg):
    """Step t reads codes[:, 0, t - 1] (step 0 the initial token); moshi's text padding and
    end-of-padding ids are not what a memory is for and are left out."""
    torch.manual_seed(0)
    lm = build_ttt_lm(tiny_cfg)
    codes = random_codes(lm, 40, seed=0)
    codes[0, 0] = 10 + codes[0, 0] % 900  # no special id but where put below
    codes[0, 0, 3] = lm.text_padding_token_id
    codes[0, 0, 7] = lm.end_of_text_padding_id
    rows, keep = readout_targets(lm, codes)
    tok = delayed_inputs(lm, codes)[:, 0, :-1]
    assert rows.shape == (1, 40, lm.dim) and keep.shape == (1, 40)
    assert not keep[0, 0] and not keep[0, 4] and not keep[0, 8]  # initial token, pad, end-pad
    want = (tok[0] != lm.text_padding_token_id) & (tok[0] != lm.end_of_text_padding_id) \
        & (tok[0] < lm.text_linear.weight.shape[0])
    assert torch.equal(keep[0], want)
    assert int(keep.sum()) == 37
    head = F.normalize(lm.text_linear.weight.detach(), dim=-1)
    torch.testing.assert_close(rows[0, keep[0]], head[tok[0, keep[0]]])


def test_calibration_fits_main_blocks_and_only_matches_depformer_ones(tiny_cfg):
    """With the tiny config's `unembedding`: a main block's recalls vote for the token read,
    through the text head alone, far more often than its random read-out did (16 text tokens
    among random audio codes); a depformer block, which predicts audio, keeps its random
    read-out's direction and gets the matched scale."""
    cfg = tiny_cfg.model_copy(update={"ttt": tiny_cfg.ttt.model_copy(
        update={"layers": [0, 1], "depformer_layers": [0]})})
    assert cfg.ttt.out_init == "unembedding"
    torch.manual_seed(0)
    lm = build_ttt_lm(cfg)
    codes = random_codes(lm, 128, seed=0).repeat(2, 1, 1)
    codes[1] = random_codes(lm, 128, seed=1)[0]
    g = torch.Generator().manual_seed(2)
    small = torch.randint(100, 100 + 16, codes[:, 0].shape, generator=g)  # 16 text tokens
    codes[:, 0] = small
    blocks = list(ttt_blocks(lm))
    wo = {(a.component, a.layer): a.block.wo.weight.detach().clone() for a in blocks}
    main = [a for a in blocks if a.component == "transformer"]

    def votes() -> list[float]:
        """Per main block: how often the recall's direct path through the text head ranks the
        token its frame read first among the 16 tokens used."""
        _, keep = readout_targets(lm, codes)
        tok = delayed_inputs(lm, codes)[:, 0, :-1]
        out = []
        for a, x in zip(main, block_inputs(lm, codes, main)):
            logits = _recalled(a.block, x) @ lm.text_linear.weight.detach()[100:116].T
            out.append(float((logits.argmax(-1) + 100 == tok)[keep].float().mean()))
        return out

    lm.eval()
    before = votes()
    calibrate_ttt(lm, codes)
    after = votes()
    for b, a in zip(before, after):  # measured: 0.06 -> 0.80 at both layers (chance 1/16)
        assert b < 0.2 and a > 0.6, (before, after)
    for a in blocks:
        w0, w = wo[(a.component, a.layer)], a.block.wo.weight.detach()
        cos = float(F.cosine_similarity(w0.flatten(), w.flatten(), dim=0))
        if a.component == "depformer":
            assert cos == pytest.approx(1.0, abs=1e-5) and not torch.equal(w, w0)
        else:
            assert abs(cos) < 0.3, (a.layer, cos)
