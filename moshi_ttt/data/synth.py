"""`moshi-ttt make-data`: a small two-speaker speech dataset, synthesised offline with espeak-ng.

Why synthesise: the demo and the tests need real speech with exact word timings, and nothing may
be downloaded. A seeded template grammar writes dialogues (the user asks, Moshi answers, and
Moshi's answers repeat or recall what the user said earlier: something a model can learn, and
something a memory layer can use). Each distinct word is synthesised once per voice with
espeak-ng, trimmed of its silence and cached; dialogues are concatenations of those waveforms with
known gaps, so every word's start and end are known exactly rather than estimated by an aligner.

Output, in moshi-finetune's format (see `index.py`):

    OUT/train.jsonl, OUT/eval.jsonl   {"path": "audio/dialogue_0000.wav", "duration": s} per line
    OUT/audio/dialogue_NNNN.wav       stereo, 24 kHz int16: left = Moshi, right = the user
    OUT/audio/dialogue_NNNN.json      {"alignments": [[word, [start_s, end_s], speaker], ...]}
    OUT/tokenizer.model               sentencepiece model on all transcripts (Moshi's special ids)
    OUT/sample_user.wav               mono 24 kHz, the user voice, a dialogue not in the data
    OUT/manifest.json                 what was made; written last, so it marks a complete OUT

espeak-ng writes 22050 Hz; every word is resampled to 24 kHz (Mimi's rate) before trimming, so the
files need no resampling when encoded and alignments are in the final sample grid.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
import struct
import subprocess
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import sentencepiece
import sphn

from .interleave import MAIN_SPEAKER
from .text_tokenizer import train_sentencepiece

logger = logging.getLogger(__name__)

USER_SPEAKER = "SPEAKER_USER"
SAMPLE_RATE = 24000
ESPEAK = "espeak-ng"
INSTALL_HINT = ("install it with `apt-get install espeak-ng` (Debian/Ubuntu; `sudo` if not root), "
                "or run `make install`, which does that")
# Bump when the grammar, the timing or the file layout changes: a manifest of another format
# is never taken for a complete dataset, so such a change rebuilds.
FORMAT_VERSION = 1
MAX_DIALOGUE_S = 30.0
MIN_DIALOGUE_S = 10.0
# A word's audio is the span where |x| exceeds this (plus a short margin), so alignments cover
# the whole audible word and nothing else.
SILENCE_THRESHOLD = 0.01
WORD_MARGIN_S = 0.01
FADE_S = 0.003
_DIALOGUE_RE = re.compile(r"^dialogue_\d{4}\.(wav|json)$")


class SynthesisError(RuntimeError):
    """espeak-ng is missing or failed; the message says which word and voice, and what to do."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: `name` is language+variant (`espeak-ng --voices`), speed in words per
    minute, pitch 0..99."""
    name: str
    speed: int
    pitch: int

    def args(self) -> list[str]:
        return ["-v", self.name, "-s", str(self.speed), "-p", str(self.pitch)]


# Two clearly different voices: Moshi a higher, faster US female variant; the user a lower,
# slower British male one.
VOICES: dict[str, Voice] = {
    MAIN_SPEAKER: Voice("en-us+f3", 175, 60),
    USER_SPEAKER: Voice("en-gb+m3", 160, 35),
}
CHANNEL = {MAIN_SPEAKER: 0, USER_SPEAKER: 1}


@dataclass(frozen=True)
class SynthesisResult:
    """What `synthesize_dataset` made (or found already made), for the CLI's log line."""
    out: Path
    train_files: int
    eval_files: int
    train_seconds: float
    eval_seconds: float
    tokenizer_vocab: int
    elapsed_s: float
    reused: bool

    def __str__(self) -> str:
        verb = "reused complete dataset" if self.reused else "synthesised"
        return (f"{verb} in {self.out}: {self.train_files} train ({self.train_seconds:.1f} s) + "
                f"{self.eval_files} eval ({self.eval_seconds:.1f} s) dialogues, tokenizer "
                f"{self.tokenizer_vocab} pieces, {self.elapsed_s:.1f} s")


# ---------------------------------------------------------------------------------------------
# Grammar: a dialogue is a list of (speaker, words) turns, drawn from a seeded rng.
# ---------------------------------------------------------------------------------------------

Turn = tuple[str, list[str]]

NAMES = ("alice bob carol david emma frank grace henry iris jack lucy max nina oscar paul rosa "
         "sam tom").split()
CITIES = {"paris": "france", "london": "england", "berlin": "germany", "rome": "italy",
          "madrid": "spain", "tokyo": "japan", "lisbon": "portugal", "vienna": "austria",
          "dublin": "ireland", "oslo": "norway", "cairo": "egypt", "lima": "peru",
          "sydney": "australia", "toronto": "canada"}
WEATHER = "sunny rainy cloudy windy snowy foggy warm cold".split()
COLOURS = "red green blue yellow orange purple pink white black brown".split()
THINGS = {"the sky": "blue", "the grass": "green", "snow": "white", "a banana": "yellow",
          "a tomato": "red", "chocolate": "brown", "a carrot": "orange", "a lemon": "yellow",
          "milk": "white", "coal": "black"}
LEGS = {"dog": "four", "cat": "four", "spider": "eight", "bird": "two", "ant": "six",
        "horse": "four", "duck": "two"}
NUMBERS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
           "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()


def _w(text: str) -> list[str]:
    return text.split()


class _DialogueWriter:
    """Writes one dialogue. `state` holds what the user said (name, colour, city), so later
    exchanges can ask Moshi to recall it."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.state: dict[str, str] = {}
        self.used: set[str] = set()

    def greeting(self) -> list[Turn]:
        r = self.rng
        hello = r.choice(["hello", "hi", "good morning", "good evening", "hey"])
        if r.random() < 0.8:
            name = self.state["name"] = r.choice(NAMES)
            user = f"{hello} moshi my name is {name}"
            moshi = r.choice([f"hello {name} how can i help you",
                              f"nice to meet you {name}",
                              f"hi {name} what would you like to know"])
        else:
            user = f"{hello} moshi"
            moshi = r.choice(["hello how can i help you today", "hi there what can i do for you"])
        return [(USER_SPEAKER, _w(user)), (MAIN_SPEAKER, _w(moshi))]

    def _weather(self) -> tuple[str, str]:
        city = self.state["city"] = self.rng.choice(sorted(CITIES))
        weather = self.rng.choice(WEATHER)
        user = self.rng.choice([f"what is the weather like in {city}",
                                f"how is the weather in {city} today"])
        moshi = self.rng.choice([f"in {city} it is {weather} today",
                                 f"it is {weather} in {city} right now"])
        return user, moshi

    def _country(self) -> tuple[str, str]:
        city = self.state["city"] = self.rng.choice(sorted(CITIES))
        return f"which country is {city} in", f"{city} is in {CITIES[city]}"

    def _favourite(self) -> tuple[str, str]:
        colour = self.state["colour"] = self.rng.choice(COLOURS)
        moshi = self.rng.choice([f"{colour} is a lovely colour", f"i like {colour} too"])
        return f"my favourite colour is {colour}", moshi

    def _thing_colour(self) -> tuple[str, str]:
        thing = self.rng.choice(sorted(THINGS))
        return f"what colour is {thing}", f"{thing} is {THINGS[thing]}"

    def _plus(self) -> tuple[str, str]:
        a, b = self.rng.randint(0, 10), self.rng.randint(0, 10)
        return (f"what is {NUMBERS[a]} plus {NUMBERS[b]}",
                f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}")

    def _after(self) -> tuple[str, str]:
        a = self.rng.randint(0, 19)
        return f"what number comes after {NUMBERS[a]}", f"after {NUMBERS[a]} comes {NUMBERS[a + 1]}"

    def _legs(self) -> tuple[str, str]:
        animal = self.rng.choice(sorted(LEGS))
        return f"how many legs does a {animal} have", f"a {animal} has {LEGS[animal]} legs"

    def _recall_name(self) -> tuple[str, str]:
        return "what is my name", f"your name is {self.state['name']}"

    def _recall_colour(self) -> tuple[str, str]:
        return ("do you remember my favourite colour",
                f"yes your favourite colour is {self.state['colour']}")

    def _recall_city(self) -> tuple[str, str]:
        return "which city did i ask about", f"you asked about {self.state['city']}"

    def exchange(self) -> list[Turn]:
        """One question and its answer; a recall only once its fact was said, and once."""
        options: list[tuple[str, Callable[[], tuple[str, str]], float]] = [
            ("weather", self._weather, 2.0), ("country", self._country, 1.0),
            ("thing", self._thing_colour, 1.0), ("plus", self._plus, 1.0),
            ("after", self._after, 1.0), ("legs", self._legs, 1.0),
        ]
        if "colour" not in self.state:
            options.append(("favourite", self._favourite, 1.5))
        for key, fn in (("name", self._recall_name), ("colour", self._recall_colour),
                        ("city", self._recall_city)):
            if key in self.state and f"recall_{key}" not in self.used:
                options.append((f"recall_{key}", fn, 2.0))
        keys = [o[0] for o in options]
        key = self.rng.choices(keys, weights=[o[2] for o in options])[0]
        self.used.add(key)
        user, moshi = dict((o[0], o[1]) for o in options)[key]()
        return [(USER_SPEAKER, _w(user)), (MAIN_SPEAKER, _w(moshi))]

    def goodbye(self) -> list[Turn]:
        r = self.rng
        user = f"{r.choice(['thank you', 'thanks'])} {r.choice(['goodbye', 'bye'])}"
        name = self.state.get("name")
        moshi = (f"goodbye {name} have a nice day" if name and r.random() < 0.7
                 else r.choice(["you are welcome see you soon", "goodbye have a nice day"]))
        return [(USER_SPEAKER, _w(user)), (MAIN_SPEAKER, _w(moshi))]


def write_script(seed: int, index: int) -> list[list[Turn]]:
    """A dialogue as exchanges: greeting, 1..4 questions, goodbye. Kept as exchanges so that
    `_fit` can drop questions from the end without breaking a recall (recalls come after
    what they recall)."""
    rng = random.Random(f"dialogue:{seed}:{index}")
    w = _DialogueWriter(rng)
    return [w.greeting()] + [w.exchange() for _ in range(rng.randint(1, 4))] + [w.goodbye()]


# ---------------------------------------------------------------------------------------------
# espeak-ng: one subprocess per distinct (voice, word), cached.
# ---------------------------------------------------------------------------------------------

def find_espeak() -> str:
    """Path of espeak-ng, or a SynthesisError saying how to install it."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise SynthesisError(f"{ESPEAK} is not on PATH; `moshi-ttt make-data` synthesises its "
                             f"speech with it: {INSTALL_HINT}")
    return path


def espeak_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SynthesisError(f"cannot run `{exe} --version`: {e}; {INSTALL_HINT}") from e
    m = re.search(r"text-to-speech:\s*(\S+)", out.stdout)
    return m.group(1) if m else out.stdout.strip().splitlines()[0] if out.stdout.strip() else "?"


def _parse_wav(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """Mono int16 PCM from espeak-ng's streamed wav. Its RIFF/data sizes are placeholders (it
    cannot seek stdout), so the data chunk is taken as everything after its header."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise SynthesisError(f"{what}: {ESPEAK} did not write a wav ({len(data)} bytes on stdout)")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            fmt = struct.unpack("<HHIIHH", data[pos + 8:pos + 24])
        elif cid == b"data":
            if fmt is None:
                break
            audio_format, channels, rate, _, _, bits = fmt
            if audio_format != 1 or channels != 1 or bits != 16:
                raise SynthesisError(f"{what}: expected 16-bit mono PCM from {ESPEAK}, got "
                                     f"format {audio_format}, {channels} channels, {bits} bits")
            body = data[pos + 8:]
            return np.frombuffer(body[:len(body) // 2 * 2], dtype="<i2"), rate
        pos += 8 + size + (size & 1)
    raise SynthesisError(f"{what}: {ESPEAK} wrote a wav without fmt/data chunks")


def _trim(x: np.ndarray, rate: int) -> np.ndarray | None:
    """The audible part of a word (with a short margin and fades against clicks), or None."""
    loud = np.nonzero(np.abs(x) > SILENCE_THRESHOLD)[0]
    if loud.size == 0:
        return None
    margin = int(WORD_MARGIN_S * rate)
    y = x[max(0, loud[0] - margin):loud[-1] + 1 + margin].copy()
    n = min(int(FADE_S * rate), y.size // 2)
    if n:
        ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
        y[:n] *= ramp
        y[-n:] *= ramp[::-1]
    return y


class WordBank:
    """Each (voice, word) synthesised once: float32 at 24 kHz, silence trimmed."""

    def __init__(self, exe: str, workers: int | None = None):
        self.exe = exe
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._cache: dict[tuple[Voice, str], np.ndarray] = {}
        self.calls = 0

    def _synth(self, voice: Voice, word: str) -> np.ndarray:
        what = f"word {word!r} with voice {voice.name} (speed {voice.speed}, pitch {voice.pitch})"
        cmd = [self.exe, *voice.args(), "--stdout", word]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SynthesisError(f"{ESPEAK} failed on {what}: {e}") from e
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip() or "no message"
            raise SynthesisError(f"{ESPEAK} failed on {what}: exit status {proc.returncode}: "
                                 f"{err} (`{ESPEAK} --voices=en` lists the voices)")
        pcm, rate = _parse_wav(proc.stdout, what)
        x = pcm.astype(np.float32) / 32768.0
        if rate != SAMPLE_RATE:
            # The whole output, silence included, is resampled, then trimmed: the resampler's
            # delay and edge effects fall in the silence that trimming removes.
            x = sphn.resample(x[None], rate, SAMPLE_RATE)[0]
        y = _trim(x, SAMPLE_RATE)
        if y is None:
            raise SynthesisError(f"{ESPEAK} produced no audible audio for {what} (expected "
                                 f"speech above {SILENCE_THRESHOLD} of full scale)")
        return np.clip(y, -1.0, 1.0)

    def prefetch(self, pairs: set[tuple[Voice, str]]) -> None:
        """Synthesise the missing pairs in parallel (one espeak-ng process each)."""
        todo = sorted((p for p in pairs if p not in self._cache),
                      key=lambda p: (p[0].name, p[0].speed, p[0].pitch, p[1]))
        if not todo:
            return
        with ThreadPoolExecutor(self.workers) as pool:
            for pair, y in zip(todo, pool.map(lambda p: self._synth(*p), todo)):
                self._cache[pair] = y
        self.calls += len(todo)

    def get(self, voice: Voice, word: str) -> np.ndarray:
        if (voice, word) not in self._cache:
            self.prefetch({(voice, word)})
        return self._cache[(voice, word)]


# ---------------------------------------------------------------------------------------------
# Layout: turns -> stereo audio + exact alignments.
# ---------------------------------------------------------------------------------------------

Alignment = list  # [word, [start_s, end_s], speaker], as written to JSON


def _layout(turns: list[Turn], bank: WordBank, rng: random.Random, channels: int = 2
            ) -> tuple[np.ndarray, list[Alignment]]:
    """Place words with known gaps: short ones within a turn, pauses between turns, and now
    and then the next speaker starting a little before the other one has finished. A speaker
    never overlaps themself, so each channel holds one voice and silence elsewhere."""
    t = rng.uniform(0.3, 0.6)
    channel_end = {MAIN_SPEAKER: 0.0, USER_SPEAKER: 0.0}
    placed: list[tuple[int, np.ndarray, int]] = []  # (channel, audio, start sample)
    aligns: list[Alignment] = []
    prev: str | None = None
    for speaker, words in turns:
        if prev is not None:
            if prev != speaker and rng.random() < 0.12:
                t -= rng.uniform(0.1, 0.3)  # a small overlap
            else:
                t += rng.uniform(0.25, 0.7)
        t = max(t, channel_end[speaker] + 0.2)
        ch = CHANNEL[speaker] if channels == 2 else 0
        for i, word in enumerate(words):
            if i:
                t += rng.uniform(0.03, 0.1)
            audio = bank.get(VOICES[speaker], word)
            start = round(t * SAMPLE_RATE)
            placed.append((ch, audio, start))
            end = start + audio.size
            aligns.append([word, [start / SAMPLE_RATE, end / SAMPLE_RATE], speaker])
            t = end / SAMPLE_RATE
        channel_end[speaker] = t
        t = max(channel_end.values())
        prev = speaker
    total = round((t + rng.uniform(0.4, 0.8)) * SAMPLE_RATE)
    pcm = np.zeros((channels, total), np.float32)
    for ch, audio, start in placed:
        pcm[ch, start:start + audio.size] += audio
    aligns.sort(key=lambda a: (a[1][0], a[2]))
    return pcm, aligns


def _fit(exchanges: list[list[Turn]], bank: WordBank, seed: int, index: int
         ) -> tuple[np.ndarray, list[Alignment], list[Turn]]:
    """Lay a dialogue out, dropping its last questions while it is longer than MAX_DIALOGUE_S
    (the greeting and the goodbye always stay)."""
    while True:
        turns = [t for ex in exchanges for t in ex]
        pcm, aligns = _layout(turns, bank, random.Random(f"layout:{seed}:{index}"))
        if pcm.shape[1] / SAMPLE_RATE <= MAX_DIALOGUE_S or len(exchanges) <= 3:
            return pcm, aligns, turns
        exchanges = exchanges[:-2] + exchanges[-1:]


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------

def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _wav_bytes(pcm: np.ndarray) -> bytes:
    """[C, S] float in [-1, 1] -> a 24 kHz int16 wav (interleaved channels)."""
    pcm16 = np.round(np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.ascontiguousarray(pcm16.T).tobytes())
    return buf.getvalue()


def _args(n_dialogues: int, seed: int, vocab_size: int) -> dict:
    return {"n_dialogues": n_dialogues, "seed": seed, "vocab_size": vocab_size}


def _complete(out: Path, args: dict) -> dict | None:
    """The manifest of a complete dataset made with these arguments, else None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION
            or manifest.get("args") != args or not isinstance(manifest.get("files"), dict)):
        return None
    for rel, size in manifest["files"].items():
        try:
            if (out / rel).stat().st_size != size:
                return None
        except OSError:
            return None
    return manifest


def _result(out: Path, manifest: dict, elapsed: float, reused: bool) -> SynthesisResult:
    return SynthesisResult(
        out=out, train_files=manifest["train"]["files"], eval_files=manifest["eval"]["files"],
        train_seconds=manifest["train"]["seconds"], eval_seconds=manifest["eval"]["seconds"],
        tokenizer_vocab=manifest["tokenizer"]["vocab_size"], elapsed_s=elapsed, reused=reused)


def _sample_user(bank: WordBank, seed: int) -> tuple[np.ndarray, str]:
    """The user's turns of a dialogue outside the dataset (its own rng stream), ~6..10 s."""
    rng = random.Random(f"sample-user:{seed}")
    w = _DialogueWriter(rng)
    exchanges = [w.greeting()] + [w.exchange() for _ in range(6)] + [w.goodbye()]
    user_turns = [t for ex in exchanges for t in ex if t[0] == USER_SPEAKER]
    turns: list[Turn] = []
    pcm = np.zeros((1, 0), np.float32)
    for turn in user_turns:
        trial, _ = _layout(turns + [turn], bank, random.Random(f"sample-layout:{seed}"), 1)
        if turns and trial.shape[1] / SAMPLE_RATE > 10.0:
            break
        turns.append(turn)
        pcm = trial
        if pcm.shape[1] / SAMPLE_RATE >= 6.0:
            break
    return pcm, " ".join(" ".join(words) for _, words in turns)


def synthesize_dataset(out: str | Path, n_dialogues: int = 16, seed: int = 0,
                       vocab_size: int = 1000) -> SynthesisResult:
    """Write the dataset into `out` (see the module docstring), or reuse it if `out` already
    holds a complete one made with the same arguments. The manifest is removed first and
    written last, so an interrupted run is rebuilt by the next call."""
    t0 = time.perf_counter()
    out = Path(out)
    n_eval = max(2, round(n_dialogues / 8))
    if n_dialogues < n_eval + 1:
        raise ValueError(f"n_dialogues must be at least {n_eval + 1} (two held out for eval, "
                         f"at least one for training), got {n_dialogues}")
    if vocab_size < 50:
        raise ValueError(f"vocab_size must be at least 50 (sentencepiece needs room for the "
                         f"characters and Moshi's 4 special ids), got {vocab_size}")
    args = _args(n_dialogues, seed, vocab_size)
    manifest = _complete(out, args)
    if manifest is not None:
        logger.info("%s already holds a complete dataset (seed %d, %d dialogues); not "
                    "re-synthesising", out, seed, n_dialogues)
        return _result(out, manifest, time.perf_counter() - t0, reused=True)

    exe = find_espeak()
    version = espeak_version(exe)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for p in audio_dir.iterdir():  # stale files of an earlier run (never anything else)
        if _DIALOGUE_RE.match(p.name) or p.name.startswith(".dialogue_"):
            p.unlink()

    scripts = [write_script(seed, i) for i in range(n_dialogues)]
    bank = WordBank(exe)
    bank.prefetch({(VOICES[spk], word) for s in scripts for ex in s for spk, words in ex
                   for word in words})
    files: dict[str, int] = {}
    lines: dict[str, list[str]] = {"train": [], "eval": []}
    seconds = {"train": 0.0, "eval": 0.0}
    texts: list[str] = []
    n_words = 0
    for i, exchanges in enumerate(scripts):
        pcm, aligns, turns = _fit(exchanges, bank, seed, i)
        duration = pcm.shape[1] / SAMPLE_RATE
        if duration < MIN_DIALOGUE_S:
            logger.debug("dialogue %d is short: %.1f s", i, duration)
        name = f"dialogue_{i:04d}"
        wav, js = audio_dir / f"{name}.wav", audio_dir / f"{name}.json"
        _write_atomic(js, json.dumps({"alignments": aligns}).encode())
        _write_atomic(wav, _wav_bytes(pcm))
        for p in (wav, js):
            files[f"audio/{p.name}"] = p.stat().st_size
        split = "eval" if i >= n_dialogues - n_eval else "train"
        lines[split].append(json.dumps({"path": f"audio/{wav.name}", "duration": duration}))
        seconds[split] += duration
        texts.extend(" ".join(words) for _, words in turns)
        n_words += len(aligns)

    sample_pcm, sample_text = _sample_user(bank, seed)
    _write_atomic(out / "sample_user.wav", _wav_bytes(sample_pcm))
    texts.append(sample_text)
    for split in ("train", "eval"):
        _write_atomic(out / f"{split}.jsonl", ("\n".join(lines[split]) + "\n").encode())
    # written in place: the manifest, written last, is what marks the dataset complete
    train_sentencepiece(texts, out / "tokenizer.model", vocab_size)
    tok_vocab = sentencepiece.SentencePieceProcessor(
        model_file=str(out / "tokenizer.model")).vocab_size()
    for rel in ("train.jsonl", "eval.jsonl", "tokenizer.model", "sample_user.wav"):
        files[rel] = (out / rel).stat().st_size

    manifest = {
        "format": FORMAT_VERSION,
        "args": args,
        "sample_rate": SAMPLE_RATE,
        "channels": {"left": MAIN_SPEAKER, "right": USER_SPEAKER},
        "voices": {spk: asdict(v) for spk, v in VOICES.items()},
        "espeak_ng_version": version,
        "train": {"index": "train.jsonl", "files": len(lines["train"]),
                  "seconds": round(seconds["train"], 3)},
        "eval": {"index": "eval.jsonl", "files": len(lines["eval"]),
                 "seconds": round(seconds["eval"], 3)},
        "total_seconds": round(seconds["train"] + seconds["eval"], 3),
        "words": n_words,
        "distinct_words": len({w for t in texts for w in t.split()}),
        "espeak_calls": bank.calls,
        "tokenizer": {"path": "tokenizer.model", "vocab_size": tok_vocab},
        "sample_user": {"path": "sample_user.wav",
                        "seconds": round(sample_pcm.shape[1] / SAMPLE_RATE, 3),
                        "text": sample_text},
        "files": files,
    }
    _write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return _result(out, manifest, time.perf_counter() - t0, reused=False)
