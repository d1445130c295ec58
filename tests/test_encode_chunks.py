"""Mimi encodes a file in bounded chunks (streaming) and gets the codes of one call over the
whole file, on a file longer than its encoder transformer's 10 s attention window."""

from __future__ import annotations

import json

import numpy as np
import sentencepiece
import torch
from moshi.models import loaders
from moshi.quantization.core_vq import EuclideanCodebook

from moshi_ttt.base import mimi_config
from moshi_ttt.config import load_config
from moshi_ttt.data.encode import StreamEncoder, read_stereo
from moshi_ttt.data.index import AudioFile
from moshi_ttt.data.mimi_chunks import encode_chunked

from conftest import CONFIGS
from fixtures import make_tokenizer, write_wav

SECONDS = 12.0  # past the 10 s window, where a plain streaming ring would drop keys


def _mimi_fitted_to(wav: torch.Tensor):
    """The tiny config's Mimi, random. A random Mimi's codebooks are all zero (every frame is
    code 0, and any two encodings agree), so fill each level's codebook with noisy samples of
    the residuals it quantizes: every level then tells frames apart."""
    torch.manual_seed(0)
    mimi = loaders.get_mimi(None, mimi_config(load_config(CONFIGS / "tiny.yaml").mimi),
                            device="cpu", num_codebooks=8).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(wav)
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            x = rvq.input_proj(latent)
            for layer in rvq.vq.layers:
                cb: EuclideanCodebook = layer._codebook
                v = layer.project_in(x.transpose(1, 2)).reshape(-1, cb.dim)
                pick = torch.randint(0, v.shape[0], (cb.codebook_size,), generator=g)
                noise = torch.randn(cb.codebook_size, cb.dim, generator=g) * 0.5 * v.std()
                cb.embedding_sum.copy_(v[pick] + noise)
                cb.cluster_usage.fill_(1.0)
                cb._initialized.fill_(1.0)
                cb._embedding = None
                x = x - layer.decode(layer.encode(x))
    return mimi


def _spy_lengths(mimi) -> list[int]:
    lengths: list[int] = []
    real = mimi.encode

    def encode(x):
        lengths.append(x.shape[-1])
        return real(x)
    mimi.encode = encode
    return lengths


def test_chunked_encoding_gives_the_codes_of_one_call():
    g = torch.Generator().manual_seed(2)
    wav = torch.randn(2, 1, int(24000 * SECONDS) + 777, generator=g) * 0.1  # not whole frames
    mimi = _mimi_fitted_to(wav)
    with torch.no_grad():
        whole = mimi.encode(wav)
    frames = whole.shape[-1]
    assert whole.shape == (2, 8, 151)
    assert min(len(whole[:, k].unique()) for k in range(8)) > 10  # codes that can disagree
    lengths = _spy_lengths(mimi)
    for chunk in (25, 10_000):
        lengths.clear()
        got = encode_chunked(mimi, wav, chunk, "cpu")
        assert torch.equal(got, whole), chunk
        assert max(lengths) <= chunk * mimi.frame_size
        assert len(lengths) == -(-frames // min(chunk, frames)), chunk


def test_the_encoder_streams_a_file_in_chunks(tmp_path):
    rng = np.random.default_rng(3)
    pcm = (rng.normal(0, 0.1, (2, int(24000 * SECONDS))) * np.hanning(int(24000 * SECONDS)))
    wav = tmp_path / "a.wav"
    write_wav(wav, pcm.astype(np.float32), 24000)
    wav.with_suffix(".json").write_text(json.dumps(
        {"alignments": [["hello", [0.5, 0.9], "SPEAKER_MAIN"]]}))
    f = AudioFile(wav, SECONDS)
    stereo = torch.from_numpy(read_stereo(f))[:, None]
    mimi = _mimi_fitted_to(stereo)
    with torch.no_grad():
        whole = mimi.encode(stereo)
    tok = make_tokenizer(tmp_path / "tok.model")
    enc = StreamEncoder(mimi, sentencepiece.SentencePieceProcessor(model_file=str(tok)), tok,
                        tmp_path / "cache")
    enc.chunk_frames = 25
    lengths = _spy_lengths(mimi)
    codes = enc.encode(f)
    assert max(lengths) == 25 * mimi.frame_size and len(lengths) == 6
    T = codes.shape[-1]
    assert T == 150
    assert torch.equal(codes[1:9], whole[0, :, :T].int())
    assert torch.equal(codes[9:17], whole[1, :, :T].int())
