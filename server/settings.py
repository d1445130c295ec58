"""Server settings: command-line flags > environment (`MOSHI_TTT_*`) > YAML file > defaults.

The YAML file may be a plain mapping of these fields or a project config whose `serve:` section
holds them, so one file can describe a model and how it is served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict,
)


#: How the engine times its steps (`batch_clock`; `server.engine.Engine._take`).
BATCH_CLOCKS = ("window", "tick")


class SettingsError(ValueError):
    """A settings file or value is missing or invalid; the message names it."""


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOSHI_TTT_", extra="forbid")

    checkpoint: Path | None = Field(
        None, description="run dir, checkpoint dir, init-base dir, or hf://OWNER/REPO[@REVISION] "
        "(downloaded at start-up; as a Path it reads hf:/OWNER/REPO, which moshi_ttt.hub "
        "accepts too)")
    random_config: Path | None = Field(
        None, description="instead of a checkpoint: a project config served with random "
        "weights (benchmarks at real sizes without downloading weights)")
    host: str = "127.0.0.1"
    port: int = Field(8998, ge=0, le=65535, description="0: any free port")
    max_sessions: int = Field(4, ge=1, description="batch rows: concurrent sessions")
    device: str = Field("auto", description="auto (cuda when available), cuda, cuda:N or cpu")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="model weights; auto: bfloat16 on GPU, float32 on CPU")

    # generation (moshi's LMGen)
    use_sampling: bool = True
    temp: float = Field(0.8, ge=0)
    temp_text: float = Field(0.7, ge=0)
    top_k: int = Field(250, ge=1)
    top_k_text: int = Field(25, ge=1)
    seed: int | None = Field(None, description="seed torch's generator at start-up")

    # batching and bounds
    batch_wait_ms: float = Field(
        20.0, ge=0, description="after the first frame is ready, wait this long for the other "
        "active sessions' frames before stepping (0: step at once)")
    batch_clock: Literal[BATCH_CLOCKS] = Field(  # type: ignore[valid-type]
        "window", description="how steps are timed: window (a step runs when every active "
        "session's frame is ready or batch_wait_ms after the first) or tick (steps on an 80 ms "
        "clock, each frame joins the next tick; batch_wait_ms unused). README: 'Batching "
        "sessions of independent phases'")
    max_buffered_frames: int = Field(
        50, ge=1, description="input frames a session may have queued (50 = 4 s); beyond it "
        "the client is sending faster than the model runs and is told and closed. Also the "
        "most audio one Ogg/Opus message may hold (beyond: closed 1009)")
    max_pending_output: int = Field(
        100, ge=1, description="output frames a client may leave untaken (a stalled reader): "
        "those queued in the server plus those written to the socket and not yet acknowledged "
        "by the client's TCP")
    max_message_bytes: int = Field(1 << 20, ge=1024, description="largest websocket message")
    idle_timeout_s: float = Field(
        30.0, gt=0, description="close a session that sends no audio (or codes) for this "
        "long (it holds a slot; a live client streams audio, silence included, every 80 ms); "
        "PING and CONTROL messages do not count, nor audio that completes no 1920-sample frame")
    max_control_per_s: float = Field(
        10.0, gt=0, description="PING and CONTROL messages a session may send per second, "
        "sustained; beyond it (and the burst) the session is told and closed (1008)")
    control_burst: int = Field(50, ge=1, description="PING/CONTROL messages allowed at once")
    max_step_failures: int = Field(
        3, ge=1, description="model steps failing in a row before the engine is declared "
        "failed (/health 503): one failing step fails only its sessions")
    warmup_frames: int = Field(4, ge=0, description="model steps run before accepting anyone")

    # TTT telemetry (moshi_ttt.telemetry)
    telemetry_every_frames: int = Field(
        12, ge=0, description="model steps between reads of every session's TTT telemetry "
        "(inner loss before/after the update, drift, input dependence), each sent to the "
        "sessions that want it; 12 = about 1 s. 0: not measured, not sent")
    telemetry_input_dependence: bool = Field(
        True, description="measure the fast weights' input dependence at each telemetry read "
        "(64 probe queries per layer and row)")

    # access
    api_key: str | None = Field(None, description="require this key (X-API-Key, Bearer, or "
                                "?api_key= for browsers); None: open")
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser Origins allowed to connect; empty: any")
    # TLS (uvicorn's own): both or neither; `moshi-ttt tls-cert DIR` makes a pair
    ssl_certfile: Path | None = Field(
        None, description="serve https/wss with this PEM certificate (chain); a browser on "
        "another machine gets the microphone only over https")
    ssl_keyfile: Path | None = Field(None, description="the certificate's PEM private key "
                                     "(unencrypted)")
    cpu_threads: int | None = Field(
        1, ge=1, description="torch threads when serving on CPU (None: torch's default). One "
        "frame's ops are small: extra threads mostly spin, and under load cost 10x")
    log_level: str = Field("info", description="uvicorn's and the server's log level: "
                           "critical, error, warning, info, debug or trace")

    @model_validator(mode="after")
    def _one_model(self) -> "ServeSettings":
        if (self.checkpoint is None) == (self.random_config is None):
            raise ValueError("give exactly one of checkpoint (a trained run, checkpoint or "
                             "init-base directory) or random_config")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeSettings":
        """TLS needs the certificate and its key, from whichever source each came."""
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            given, missing = (("certificate", "--ssl-keyfile (ssl_keyfile)")
                              if self.ssl_keyfile is None
                              else ("private key", "--ssl-certfile (ssl_certfile)"))
            raise ValueError(f"a TLS {given} was given without {missing}: give both a "
                             f"certificate and its private key, or neither; `moshi-ttt tls-cert "
                             f"DIR` makes a pair")
        return self

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, v: str | None) -> str | None:
        """An empty key (`MOSHI_TTT_API_KEY=`, `api_key: ""`) would serve without
        authentication, silently; leaving the setting out is how to serve open."""
        if v is not None and not v.strip():
            raise ValueError("the API key is empty (or only whitespace), which would turn "
                             "authentication off: give a non-empty key, or leave api_key unset "
                             "(no MOSHI_TTT_API_KEY, no --api-key) to serve without one")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        """One of uvicorn's levels (it fails with a KeyError deep in its start-up otherwise),
        lower-cased as uvicorn reads it."""
        from uvicorn.config import LOG_LEVELS

        level = v.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {v!r}: expected one of "
                             f"{', '.join(LOG_LEVELS)}")
        return level

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        """A device torch can parse (it raises later, with a traceback, otherwise). Whether a
        CUDA device is there is checked when the model is placed (`server.app`), with its own
        message."""
        if v == "auto":
            return v
        import torch

        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {v!r}: expected auto, cpu, cuda or cuda:N") \
                from None
        return v

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        """A string is a JSON list or comma-separated origins (as an environment variable)."""
        if isinstance(v, str):
            if v.strip().startswith("["):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError as e:
                    raise ValueError(f"allowed_origins {v!r} starts like a JSON list but is not "
                                     f"one ({e}); give a JSON list of strings or "
                                     f"comma-separated origins") from None
            else:
                return [o.strip() for o in v.split(",") if o.strip()]
        return v

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return (init_settings, _EnvSource(settings_cls), dotenv_settings, file_secret_settings)

    @classmethod
    def load(cls, yaml_file: Path | None = None, **overrides: Any) -> "ServeSettings":
        """Settings from flags (`overrides`, None values ignored), env, then `yaml_file`."""
        file_values = read_settings_file(yaml_file) if yaml_file else {}
        flags = {k: v for k, v in overrides.items() if v is not None}

        class _WithFile(cls):  # type: ignore[misc, valid-type]
            @classmethod
            def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                           dotenv_settings, file_secret_settings):
                return (init_settings, _EnvSource(settings_cls),
                        _MappingSource(settings_cls, file_values))

        try:
            return cls.model_validate(_WithFile(**flags).model_dump())
        except ValueError as e:
            where = f" (file {yaml_file})" if yaml_file else ""
            raise SettingsError(f"invalid server settings{where}:\n{e}") from e


class _EnvSource(EnvSettingsSource):
    """`MOSHI_TTT_*` variables. pydantic-settings reads a list field's variable as JSON only;
    `allowed_origins` also takes the comma-separated form (`a,b`), which `_split` handles."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        if field_name == "allowed_origins" and isinstance(value, str):
            return value
        return super().decode_complex_value(field_name, field, value)


class _MappingSource(PydanticBaseSettingsSource):
    """Lowest-priority source: values read from the YAML file."""

    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]):
        super().__init__(settings_cls)
        self.values = values

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


def read_settings_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"settings file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SettingsError(f"settings file {path} must hold a mapping")
    if "serve" in raw and isinstance(raw["serve"], dict):  # a project config
        raw = raw["serve"]
    return raw
