"""The websocket protocol of `WS /api/chat`: moshi's binary protocol, plus PCM and token modes.

Every message is one binary websocket frame whose first byte is its kind (moshi's numbering, so
moshi's own clients work unchanged in the default `opus` mode):

    kind  name       direction        payload
    0     HANDSHAKE  server -> client version byte, model byte (both 0), sent once the session's
                                      slot is ready; input sent before it is kept (its last
                                      max_buffered_frames / 2 frames) and answered after it
    1     AUDIO      both             opus mode: Ogg/Opus pages, 24 kHz mono;
                                      pcm mode: float32 little-endian samples, 24 kHz mono
    2     TEXT       server -> client UTF-8 text piece of Moshi's text stream
    3     CONTROL    client -> server one byte; accepted and ignored (moshi reserves it)
    4     METADATA   server -> client UTF-8 JSON: right after the handshake the session info
                                      ("type": "session": session id, mode, sample rate,
                                      frame size, model dims, telemetry_every); then, every
                                      telemetry_every frames, the session's TTT telemetry
                                      ("type": "ttt_telemetry", see moshi_ttt.telemetry)
    5     ERROR      server -> client UTF-8 reason; the server then closes the socket
    6     PING       both             empty; ignored
    7     CODES      both             tokens mode only. client -> server: int32 LE, n frames x 8
                                      user codes; server -> client: int32 LE, n frames x 9
                                      (text token, then Moshi's 8 codes); -2 = not generated yet

Mode and credentials come as query parameters: `/api/chat?mode=opus|pcm|tokens&api_key=...`
(the API key may also come as an `X-API-Key` header or `Authorization: Bearer ...`).
`telemetry=1|0` turns the telemetry messages on or off; without it they are on for clients that
choose a mode (`mode=...`: clients that know this protocol) and off for a bare `/api/chat`, which
is how Moshi's own clients connect: moshi/client.py prints a warning line for every METADATA
message and Moshi's web client logs a schema error for each, so they get only the session info.
One frame is 1920 samples (80 ms) at 24 kHz; PCM and Opus input of any chunk size is re-framed.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import numpy as np

SAMPLE_RATE = 24000
FRAME_RATE = 12.5
FRAME_SIZE = 1920  # samples per 80 ms frame
NUM_CODEBOOKS = 8  # Mimi codebooks per audio stream used by Moshi
NOT_GENERATED = -2  # token value: the model has not produced this position yet
TEXT_PADDING_IDS = (0, 3)  # Moshi's text padding / end-of-padding: never shown as text
HANDSHAKE = b"\x00\x00\x00"


class Kind(enum.IntEnum):
    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6
    CODES = 7


class Mode(str, enum.Enum):
    OPUS = "opus"
    PCM = "pcm"
    TOKENS = "tokens"


class Close(enum.IntEnum):
    """Websocket close codes the server uses (RFC 6455 and IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down
    UNSUPPORTED = 1003  # text frame, unknown kind, wrong kind for the mode
    INVALID = 1007  # malformed payload (bad Opus, NaN audio, bad codes)
    POLICY = 1008  # refused: auth, origin, mode, input buffer full, slow reader, idle
    TOO_BIG = 1009  # message over the size limit
    INTERNAL = 1011  # the session failed on the server (e.g. its TTT state diverged)
    TRY_AGAIN = 1013  # all slots taken


class ProtocolError(ValueError):
    """A message that breaks the protocol; `close_code` says how the server closes."""

    def __init__(self, message: str, close_code: int = Close.UNSUPPORTED):
        super().__init__(message)
        self.close_code = int(close_code)


TELEMETRY_TYPE = "ttt_telemetry"  # "type" of a telemetry METADATA message (moshi_ttt.telemetry)


def is_telemetry(info: Any) -> bool:
    """Whether a METADATA payload (parsed JSON) is a TTT telemetry message, not session info."""
    return isinstance(info, dict) and info.get("type") == TELEMETRY_TYPE


_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def wants_telemetry(query: Any) -> bool:
    """Whether a session asked for telemetry messages (`telemetry=` in its query; see the top).
    Raises ValueError for a value that is neither on nor off."""
    value = query.get("telemetry")
    if value is None:
        return query.get("mode") is not None
    if value.lower() in _ON:
        return True
    if value.lower() in _OFF:
        return False
    raise ValueError(f"telemetry={value!r}: expected 1 or 0 (or true/false, on/off)")


def pack(kind: Kind, payload: bytes = b"") -> bytes:
    return bytes([int(kind)]) + payload


def unpack(message: bytes) -> tuple[Kind, bytes]:
    """Split a binary message into (kind, payload); unknown or empty messages raise."""
    if not message:
        raise ProtocolError("empty message: expected a kind byte followed by a payload")
    try:
        kind = Kind(message[0])
    except ValueError:
        raise ProtocolError(
            f"unknown message kind {message[0]}: expected one of "
            f"{', '.join(f'{k.value} ({k.name})' for k in Kind)}") from None
    return kind, message[1:]


def text(piece: str) -> bytes:
    return pack(Kind.TEXT, piece.encode("utf-8"))


def error(reason: str) -> bytes:
    return pack(Kind.ERROR, reason.encode("utf-8"))


def metadata(info: dict[str, Any]) -> bytes:
    return pack(Kind.METADATA, json.dumps(info).encode("utf-8"))


def pcm_to_bytes(pcm: np.ndarray) -> bytes:
    return np.ascontiguousarray(pcm, dtype="<f4").tobytes()


def pcm_from_bytes(payload: bytes) -> np.ndarray:
    """float32 LE samples; NaN/inf or a ragged length is malformed input."""
    if len(payload) % 4:
        raise ProtocolError(f"PCM payload of {len(payload)} bytes is not a whole number of "
                            f"float32 samples", Close.INVALID)
    pcm = np.frombuffer(payload, dtype="<f4")
    if not np.isfinite(pcm).all():
        raise ProtocolError("PCM payload contains NaN or infinite samples", Close.INVALID)
    return pcm.astype(np.float32)


def codes_to_bytes(codes: np.ndarray) -> bytes:
    return pack(Kind.CODES, np.ascontiguousarray(codes, dtype="<i4").tobytes())


def codes_from_bytes(payload: bytes, per_frame: int, card: int | None = None) -> np.ndarray:
    """Decode n x per_frame int32 LE codes; values must be in [0, card) when card is given."""
    if not payload or len(payload) % (4 * per_frame):
        raise ProtocolError(f"codes payload of {len(payload)} bytes is not a whole number of "
                            f"frames of {per_frame} int32 codes", Close.INVALID)
    codes = np.frombuffer(payload, dtype="<i4").reshape(-1, per_frame)
    if card is not None and ((codes < 0) | (codes >= card)).any():
        bad = codes[(codes < 0) | (codes >= card)][:4].tolist()
        raise ProtocolError(f"codes out of range {bad}: expected 0 <= code < {card}",
                            Close.INVALID)
    return codes.astype(np.int64)
