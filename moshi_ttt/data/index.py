"""moshi-finetune's dataset format: a `.jsonl` index of stereo wavs with word alignments.

    {"path": "audio/a.wav", "duration": 41.3}        one line per file; relative paths are
                                                      relative to the index file's directory
    audio/a.wav    stereo: left = Moshi, right = the user; any sample rate (resampled to 24 kHz)
    audio/a.json   {"alignments": [[word, [start_s, end_s], speaker], ...]}

Everything is checked up front, so a bad file fails the run before training starts, with the
file named and what was expected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

Alignment = tuple[str, tuple[float, float], str]


class DataError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names it."""


@dataclass(frozen=True)
class AudioFile:
    path: Path
    duration: float  # seconds, as the index says (checked against the audio when encoded)

    @property
    def alignments_path(self) -> Path:
        return self.path.with_suffix(".json")


_BOM = b"\xef\xbb\xbf"  # what Windows editors put at the start of UTF-8 files


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text, or a DataError naming the file (and line) and the offending byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at "
                        f"offset {e.start}); expected UTF-8 JSON") from None


def read_index(index: str | Path) -> list[AudioFile]:
    """Parse and check an index: JSON per line, path and duration present, files exist."""
    index = Path(index)
    if not index.is_file():
        raise DataError(f"dataset index not found: {index}")
    files: list[AudioFile] = []
    for lineno, raw in enumerate(index.read_bytes().splitlines(), 1):
        where = f"{index}:{lineno}"
        line = _decode(raw.removeprefix(_BOM) if lineno == 1 else raw, where)
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e}); expected "
                            f'{{"path": ..., "duration": ...}}') from e
        if not isinstance(entry, dict) or "path" not in entry or "duration" not in entry:
            raise DataError(f"{where}: expected an object with 'path' and 'duration', got {line!r}")
        try:
            duration = float(entry["duration"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: duration {entry['duration']!r} is not a number") from None
        if not math.isfinite(duration) or duration <= 0:
            raise DataError(f"{where}: duration must be a positive number of seconds, "
                            f"got {duration}")
        if not isinstance(entry["path"], str) or not entry["path"].strip():
            raise DataError(f"{where}: path {entry['path']!r} is not a file name; expected a "
                            f"string, relative to the index's directory or absolute")
        path = Path(entry["path"])
        if not path.is_absolute():
            path = index.parent / path
        if not path.is_file():
            raise DataError(f"{where}: audio file not found: {path}")
        f = AudioFile(path, duration)
        if not f.alignments_path.is_file():
            raise DataError(f"{where}: alignment file not found: {f.alignments_path} (expected "
                            f"a sibling .json with {{\"alignments\": [[word, [start, end], "
                            f"speaker], ...]}})")
        files.append(f)
    if not files:
        raise DataError(f"dataset index {index} lists no files")
    return files


def read_alignments(f: AudioFile, audio_duration: float, tolerance: float = 0.05
                    ) -> list[Alignment]:
    """Load and check a file's alignments: well-formed entries, inside the audio."""
    p = f.alignments_path
    try:
        data = json.loads(_decode(p.read_bytes().removeprefix(_BOM), str(p)))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read alignments {p}: {e}") from e
    raw = data.get("alignments") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise DataError(f"{p}: expected {{\"alignments\": [[word, [start, end], speaker], ...]}}")
    out: list[Alignment] = []
    for i, a in enumerate(raw):
        try:
            word, (start, end), speaker = a
            start, end = float(start), float(end)
        except (TypeError, ValueError):
            raise DataError(f"{p}: alignment #{i} {a!r} is not [word, [start, end], speaker]") \
                from None
        if not isinstance(word, str):
            raise DataError(f"{p}: alignment #{i} {a!r}: the word is {word!r}; expected a string")
        if not (math.isfinite(start) and math.isfinite(end)) or start < -tolerance:
            raise DataError(f"{p}: alignment #{i} ({word!r}) has invalid times {start}..{end}")
        if end < start:  # the text stream would drop the word without a word said
            raise DataError(f"{p}: alignment #{i} ({word!r}) ends at {end} s, before it starts "
                            f"({start} s); expected [start, end] with start <= end")
        if end > audio_duration + tolerance:
            raise DataError(f"{p}: alignment #{i} ({word!r}) ends at {end:.2f} s, outside the "
                            f"audio ({audio_duration:.2f} s long)")
        out.append((str(word), (start, end), str(speaker)))
    out.sort(key=lambda a: a[1][0])
    return out
