"""A user's own YAML: values moshi or the TTT block would fail on later (a TypeError or a bare
AssertionError deep in the build or at the first forward), or silently misread, are refused at
config load with a message naming the key, the value and what is expected."""

import copy

import pytest
import yaml
from moshi.models import loaders
from typer.testing import CliRunner

from moshi_ttt.block import TTTBlock
from moshi_ttt.cli import app
from moshi_ttt import config
from moshi_ttt.config import ConfigError, TTTConfig, load_config
from moshi_ttt.model import build_ttt_lm

from conftest import CONFIGS

TINY = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())


def _write(tmp_path, lm=None, ttt=None, drop_lm=(), text_edit=None):
    raw = copy.deepcopy(TINY)
    raw["lm"].update(lm or {})
    raw["ttt"].update(ttt or {})
    for k in drop_lm:
        raw["lm"].pop(k)
    text = yaml.safe_dump(raw, sort_keys=False)
    if text_edit:
        old, new = text_edit
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "user.yaml"
    path.write_text(text)
    return path


def _error(path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return str(e.value)


@pytest.mark.parametrize("case, expected", [
    # before: TypeError "StreamingTransformerLayer.__init__() got an unexpected keyword ..."
    (dict(lm={"hidden_scal": 4.125}), ["lm: unknown key(s) ['hidden_scal']", "typo"]),
    (dict(lm={"moshi_name": "model.safetensors"}), ["['moshi_name']", "file settings"]),
    # before: TypeError from torch.empty ("type must be tuple of ints, but got str")
    (dict(lm={"dim": "64"}), ["lm.dim: '64' is a string, expected a number"]),
    # YAML 1.1 reads 1e4 as a string; before: accepted, failing inside moshi's rope
    (dict(text_edit=("\n  max_period: 10000\n", "\n  max_period: 1e4\n")),
     ["lm.max_period: '1e4' is a string", "1.0e4"]),
    # before: a bare AssertionError from moshi's attention
    (dict(lm={"num_heads": 3}), ["lm.dim 64 is not divisible by lm.num_heads 3"]),
    (dict(lm={"depformer_num_heads": 3}),
     ["lm.depformer_dim 32 is not divisible by lm.depformer_num_heads 3"]),
    # before: TypeError "object of type 'int' has no len()"
    (dict(lm={"delays": 5}), ["lm.delays: expected a list of n_q + 1 integers >= 0, got 5"]),
    (dict(lm={"n_q": "x"}), ["lm.n_q: expected an integer >= 0, got 'x'"]),
    (dict(lm={"dim": 0}), ["lm.dim: expected an integer >= 1, got 0"]),
    # before: TypeError "missing 1 required positional argument: 'num_heads'"
    (dict(drop_lm=["depformer_num_heads"]), ["lm.depformer_num_heads is required", "dep_q 8"]),
    # before: accepted, then "model has no depformer" when building
    (dict(lm={"dep_q": 0}, ttt={"depformer_layers": [0]}),
     ["ttt.depformer_layers [0]: the model has no depformer (lm.dep_q is 0)"]),
])
def test_lm_section_errors_name_the_key(tmp_path, case, expected):
    msg = _error(_write(tmp_path, **case))
    for part in expected:
        assert part in msg, msg


@pytest.mark.parametrize("ttt, expected", [
    # before: 0 silently meant the host's 4 heads; -2 a "negative dimension" RuntimeError
    ({"num_heads": 0}, ["ttt.num_heads", "greater than or equal to 1"]),
    ({"num_heads": -2}, ["ttt.num_heads", "greater than or equal to 1"]),
    # before: accepted, then a ValueError naming no key when the model was built
    ({"num_heads": 3}, ["ttt.num_heads 3 does not divide the transformer's width lm.dim 64"]),
    ({"num_heads": 64, "depformer_layers": [0]},
     ["ttt.num_heads 64 does not divide the depformer's width lm.depformer_dim 32"]),
    # before: accepted, then a bare AssertionError in apply_rope at the first forward
    ({"num_heads": 2, "rope": True, "layers": [0]}, []),  # head dim 32: fine
    # before: accepted; every output NaN
    ({"base_lr": float("inf")}, ["ttt.base_lr", "finite number"]),
    ({"gate_init": float("nan")}, ["ttt.gate_init", "finite number"]),
    ({"ln_eps": 0.0}, ["ttt.ln_eps", "greater than 0"]),
    ({"ln_eps": -1.0}, ["ttt.ln_eps", "greater than 0"]),
    # before: accepted; the shift silently became the identity
    ({"qk_conv": 1, "qk_conv_init": "shift"}, ["ttt.qk_conv_init 'shift' needs ttt.qk_conv >= 2"]),
    # before: a TypeError ("'float' object is not iterable") escaped load_config
    ({"layers": 1.0}, ["ttt.layers", "got 1.0 (float)"]),
    # before: "1,1" silently [1] (a list [1, 1] was refused); 1.5 and true silently layer 1
    ({"layers": "1,1"}, ["lists layer(s) [1] twice"]),
    ({"layers": [1.5]}, ["1.5 is not a layer index"]),
    ({"layers": [True]}, ["True is not a layer index"]),
])
def test_ttt_section_errors_name_the_key(tmp_path, ttt, expected):
    path = _write(tmp_path, ttt=ttt)
    if not expected:
        load_config(path)
        return
    msg = _error(path)
    for part in expected:
        assert part in msg, msg


def test_rope_needs_an_even_ttt_head_dim(tmp_path):
    msg = _error(_write(tmp_path, lm={"dim": 66, "num_heads": 2},
                        ttt={"num_heads": None, "rope": True}))
    assert "ttt.rope needs an even TTT head dim" in msg
    assert "lm.dim 66 / lm.num_heads (ttt.num_heads unset) 2 = 33" in msg
    with pytest.raises(ValueError, match="needs an even head dim, got d_model 66 / num_heads 2"):
        TTTBlock(66, 2, TTTConfig(rope=True))


def test_no_false_alarm_on_moshi_and_shipped_configs():
    config.check_lm_section(dict(loaders._lm_kwargs))  # moshi's own 7B kwargs
    for name in ("tiny.yaml", "moshi-7b.yaml"):
        load_config(CONFIGS / name)


def test_the_shipped_configs_have_the_same_inner_learner():
    """tiny.yaml is where the TTT design is measured (eval-memory, diagnose-ttt); the 7B config
    must ship the same learner, or those measurements say nothing about it. They differ only in
    where the blocks go, their heads, and the four settings measured on the tiny base alone,
    which the 7B keeps at their cautious values until a trained 7B is measured: the output gate,
    the inner step, the output init and the conv taps' lr (README, "The TTT layer")."""
    tiny, big = (load_config(CONFIGS / n).ttt.model_dump() for n in ("tiny.yaml", "moshi-7b.yaml"))
    where = {"layers", "depformer_layers", "num_heads"}
    tiny_only = {"gate_init": (2.0, 0.1), "base_lr": (8.0, 1.0),
                 "out_init": ("unembedding", "random"), "qk_conv_lr_scale": (10.0, 1.0)}
    assert {k: v for k, v in tiny.items() if k not in where | set(tiny_only)} == \
        {k: v for k, v in big.items() if k not in where | set(tiny_only)}
    assert {k: (tiny[k], big[k]) for k in tiny_only} == tiny_only
    assert tiny["qkv_init"] == "whitened"


def test_ttt_num_heads_unset_uses_the_hosts_heads():
    cfg = load_config(CONFIGS / "tiny.yaml")
    cfg.ttt.num_heads = None
    lm = build_ttt_lm(cfg, device="meta")
    assert lm.transformer.layers[0].ttt.num_heads == 4


def test_inspect_names_a_typo_instead_of_a_traceback(tmp_path):
    path = _write(tmp_path, lm={"hidden_scal": 4.125})
    res = CliRunner().invoke(app, ["inspect", "--config", str(path)])
    assert res.exit_code == 2, (res.output, res.exception)
    assert "unknown key(s) ['hidden_scal']" in res.output


def test_a_string_number_in_the_ttt_section_still_reads_as_a_number(tmp_path):
    """The ttt section is typed, so pydantic reads YAML's 1e-3 (a string) as the float."""
    path = _write(tmp_path, text_edit=("  base_lr: 8.0\n", "  base_lr: 1e-3\n"))
    assert load_config(path).ttt.base_lr == pytest.approx(1e-3)


@pytest.mark.parametrize("mimi, expected", [
    # before: moshi's get_mimi ignored the section and built the full 79 M-parameter Mimi
    ({"seanett": {"n_filters": 8}}, ["mimi: unknown section(s) ['seanett']"]),
    # before: TypeError "SEANetEncoder.__init__() got an unexpected keyword argument"
    ({"seanet": {"n_filter": 8}}, ["mimi.seanet: unknown key(s) ['n_filter']", "n_filters"]),
    ({"quantizer": {"n_qq": 8}}, ["mimi.quantizer: unknown key(s) ['n_qq']"]),
    ({"seanet": 5}, ["mimi.seanet: expected a mapping of overrides, got 5"]),
])
def test_mimi_section_errors_name_the_key(tmp_path, mimi, expected):
    raw = copy.deepcopy(TINY)
    raw["mimi"] = mimi
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump(raw))
    msg = _error(path)
    for part in expected:
        assert part in msg, msg
