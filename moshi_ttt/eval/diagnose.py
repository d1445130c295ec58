"""`moshi-ttt diagnose-ttt`: is each TTT layer's inner learner alive over a streamed session?
(Its inputs: a dataset's codes or random ones; the streaming measurement itself is
`moshi_ttt.diagnostics.diagnose`, which the trainer's first-batch check also runs.)

N frames stream through a built model one at a time (moshi's streaming state, teacher-forced
tokens: speech codes of a dataset encoded by the model's own codec when one is given, else random
tokens), and every `every` frames each TTT layer of the main transformer reports, for batch row 0
(see `moshi_ttt.diagnostics`): the input dependence of its inner output and its ratio to the value
at W0 (frame 0), the fast-weight norms and their drift from W0, and the effective step of the
commits since the last report; and once, over the first frames, how well its keys tell frames
apart (`moshi_ttt.diagnostics.key_selectivity`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel


logger = logging.getLogger(__name__)


def random_codes(lm: LMModel, frames: int, seed: int) -> torch.Tensor:
    """[1, 17, frames] uniform valid tokens on every stream."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, frames), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (1, frames), generator=g)
    return codes


def dataset_codes(loaded: Any, data: Path, frames: int) -> torch.Tensor:
    """[1, 17, frames]: the files of a dataset index (DATA/train.jsonl for a directory) encoded
    into Moshi's 17 streams by the model's own codec and tokenizer, one after the other, repeated
    until `frames`."""
    from ..codec.calibrate import training_index
    from ..data.encode import StreamEncoder
    from ..data.index import read_index

    index = training_index(data)
    enc = StreamEncoder(loaded.mimi, loaded.tokenizer, Path(loaded.base.info.tokenizer),
                        index.parent / ".token-cache")
    streams = [enc.encode(f) for f in read_index(index)]
    enc.save_memo()
    codes = torch.cat(streams, dim=-1)
    reps = -(-frames // codes.shape[-1])
    return codes.repeat(1, reps)[None, :, :frames].long()


@torch.no_grad()
def format_diagnosis(report: dict[str, Any], rows: int = 8) -> str:
    """A table per layer: a few evenly spaced records of the series."""
    out = [f"{report['frames']} frames streamed ({report.get('source', '')}), K = "
           f"{report['mini_batch_size']}; input dependence = std over probe queries of "
           f"LN(f_W(q)); ratio = dependence / dependence at W0; drift = ||W - W0|| / ||W0||; "
           f"step = ||W after - before|| / ||W before|| per commit"]
    for lay in report["layers"]:
        s = lay["series"]
        pick = sorted({round(i * (len(s) - 1) / max(1, rows - 1)) for i in range(rows)})
        out.append(f"layer {lay['layer']}{'  COLLAPSED' if lay['collapsed'] else ''}")
        out.append("   frame  dependence   ratio     norm    drift     step")
        for i in pick:
            r = s[i]
            out.append(f"  {r['frame']:>6}  {r['dependence']:>10.4f}  {r['ratio']:>6.3f}  "
                       f"{r['norm']:>7.2f}  {r['drift']:>7.4f}  {r['step']:>7.5f}")
        if "keys" in lay:
            k = lay["keys"]
            out.append(f"  keys of the first {k['frames']} frames: mean cosine "
                       f"{k['key_cosine']:.3f}, crosstalk {k['crosstalk']:.3f} (the share of a "
                       f"write another key reads back; near 1 the memory cannot tell frames "
                       f"apart)")
    return "\n".join(out)
