"""One clip from a seed: plan the arrangement, render each part, pan, add a room, master to -1 dBFS peak.

`render_clip(seed, ...)` is deterministic: every musical choice comes from `np.random.default_rng(seed)`, the text from
a second generator seeded with `[seed, 1]` (captions can change without changing audio) and the notes' noise from a
third seeded with `[seed, 2]`. The overrides `bpm`, `key` and `mode` replace a value after it is drawn, so the rest of
the plan stays the same; `bpm_range` and `instruments_allowed` restrict what is drawn. Audio is float32
`[2, samples]`, the layout of musicdiff.audio.io.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
from scipy import signal

from data_pipelines.synthetic import captions, instruments, music

PEAK_DBFS = -1.0
FADE_IN_SECONDS = 0.005
FADE_OUT_SECONDS = 0.06
ALL_INSTRUMENTS = tuple(instruments.INSTRUMENTS)
HARMONY_CHOICES = {"piano": 3, "guitar": 3, "pad": 2, "organ": 2}
MELODY_CHOICES = {"piano": 3, "guitar": 2, "marimba": 2, "lead": 2, "organ": 1}
MELODY_RANGE = {"piano": (60, 84), "guitar": (55, 79), "marimba": (60, 84), "lead": (60, 84), "organ": (60, 79)}
COMPING_CHOICES = {
    "piano": ("halves", "quarters", "arpeggio", "offbeat"),
    "guitar": ("quarters", "arpeggio", "offbeat", "halves"),
    "organ": ("sustain", "halves", "quarters", "offbeat"),
    "pad": ("sustain", "halves"),
}
PULSING_COMPING = ("quarters", "arpeggio")  # without drums the harmony itself must mark every beat
ORGAN_DRAWBARS = ("888000000", "808808008", "008800000", "848000000")  # jazz, gospel, flute, mellow
# Mix: RMS level (dBFS) each track is set to before panning, and how much of it goes to the reverb.
TRACK_LEVEL_DB = {"melody": -18.0, "harmony": -21.0, "texture": -25.0, "bass": -18.0, "kick": -17.0, "snare": -20.0,
                  "hat": -27.0}
REVERB_SEND = {"melody": 0.3, "harmony": 0.3, "texture": 0.5, "bass": 0.03, "kick": 0.03, "snare": 0.25, "hat": 0.1}


@dataclass(frozen=True)
class ClipPlan:
    seed: int
    seconds: float
    sample_rate: int
    key: music.Key
    bpm: int
    progression: tuple[int, ...]
    chords: tuple[music.Chord, ...]
    parts: dict[str, str]  # role -> instrument name; roles: melody, harmony, texture, bass, drums
    bass_pattern: str | None
    comping: str | None
    drum_pattern: str | None
    pans: dict[str, float]  # role (drums: "kick", "snare", "hat") -> -1 (left) .. 1 (right)
    drawbars: str
    reverb_seconds: float
    reverb_mix: float
    energy: str
    mood: str

    @property
    def num_bars(self) -> int:
        return len(self.chords)

    @property
    def instruments(self) -> list[str]:
        return list(dict.fromkeys(self.parts.values()))


@dataclass
class Clip:
    audio: np.ndarray  # float32 [2, samples]
    sample_rate: int
    attributes: dict[str, Any]
    caption: str
    title: str
    artist: str = captions.ARTIST
    license: str = captions.LICENSE


def _pick(rng: np.random.Generator, weighted: dict[str, float], allowed: set[str]) -> str | None:
    names = [n for n in weighted if n in allowed]
    if not names:
        return None
    weights = np.array([weighted[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def energy_word(bpm: int, drum_pattern: str | None) -> str:
    intensity = -1 if drum_pattern is None else music.DRUM_INTENSITY[drum_pattern]
    score = (bpm - 70) / 30.0 + intensity
    for threshold, word in ((1.0, "calm"), (2.0, "relaxed"), (3.0, "steady"), (4.0, "upbeat")):
        if score < threshold:
            return word
    return "energetic"


def plan_clip(seed: int, seconds: float = 10.0, sample_rate: int = 44100, *, bpm_range: tuple[int, int] = (70, 160),
              bpm_step: int = 1, instruments_allowed: tuple[str, ...] = ALL_INSTRUMENTS, bpm: int | None = None,
              key: str | None = None, mode: str | None = None) -> ClipPlan:
    """Draws every musical decision of a clip. `key` is a tonic name ("Eb", "F#") and `mode` "major"/"minor"."""
    unknown = set(instruments_allowed) - set(ALL_INSTRUMENTS)
    if unknown or not instruments_allowed:
        raise ValueError(f"instruments {sorted(unknown) or '()'}: choose from {', '.join(ALL_INSTRUMENTS)}")
    if mode is not None and mode not in music.MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(music.MODES)}")
    rng = np.random.default_rng(seed)
    allowed = set(instruments_allowed)
    # bpm_min + step * k: the same draw as integers(bpm_min, bpm_max + 1) when step is 1
    drawn_bpm = bpm_range[0] + bpm_step * int(rng.integers(0, (bpm_range[1] - bpm_range[0]) // bpm_step + 1))
    bpm = drawn_bpm if bpm is None else int(bpm)
    drawn_key = music.Key(int(rng.integers(12)), music.MODES[int(rng.integers(2))])
    tonic = drawn_key.tonic if key is None else _pitch_class(key)
    key_ = music.Key(tonic, drawn_key.mode if mode is None else mode)
    progressions = music.PROGRESSIONS[key_.mode]
    progression = progressions[int(rng.integers(len(progressions)))]
    chords = tuple(music.chords_per_bar(key_, progression, seconds * bpm / 60.0))

    parts: dict[str, str] = {}
    harmony = _pick(rng, HARMONY_CHOICES, allowed)
    melody = _pick(rng, MELODY_CHOICES, allowed - {harmony}) or _pick(rng, MELODY_CHOICES, allowed)
    if melody:
        parts["melody"] = melody
    if harmony:
        parts["harmony"] = harmony
    if "pad" in allowed and harmony not in (None, "pad") and rng.random() < 0.3:
        parts["texture"] = "pad"
    if "bass" in allowed and (rng.random() < 0.9 or allowed == {"bass"}):
        parts["bass"] = "bass"
    can_pulse_without_drums = harmony in ("piano", "guitar", "organ")
    skip_drums = can_pulse_without_drums and rng.random() < (0.3 if bpm < 100 else 0.05)
    drum_pattern = None
    if "drums" in allowed and (not skip_drums or not parts):
        parts["drums"] = "drums"
        drum_pattern = _pick(rng, _drum_pattern_weights(bpm), set(music.DRUM_PATTERNS))
    comping = None
    if harmony:
        options = COMPING_CHOICES[harmony] if drum_pattern else PULSING_COMPING
        comping = options[int(rng.integers(len(options)))]
    bass_pattern = None
    if "bass" in parts:
        calm = drum_pattern in (None, "soft")
        options = ("whole", "halves", "arpeggiated") if calm else ("root_fifth", "pulse", "syncopated", "halves")
        bass_pattern = options[int(rng.integers(len(options)))]

    side = 1.0 if rng.random() < 0.5 else -1.0
    pans = {"melody": side * float(rng.uniform(0.0, 0.35)), "harmony": -side * float(rng.uniform(0.3, 0.6)),
            "texture": side * float(rng.uniform(0.2, 0.5)), "bass": 0.0, "kick": 0.0, "snare": 0.0,
            "hat": -side * float(rng.uniform(0.15, 0.4))}
    drawbars = ORGAN_DRAWBARS[int(rng.integers(len(ORGAN_DRAWBARS)))]
    reverb_seconds = float(rng.uniform(0.6, 1.6))
    reverb_mix = float(rng.uniform(0.12, 0.3))
    energy = energy_word(bpm, drum_pattern)
    mood = captions.mood_word(key_.mode, energy, rng)
    return ClipPlan(seed, float(seconds), int(sample_rate), key_, bpm, progression, chords, parts, bass_pattern,
                    comping, drum_pattern, pans, drawbars, reverb_seconds, reverb_mix, energy, mood)


def _drum_pattern_weights(bpm: int) -> dict[str, float]:
    """Grooves that suit the tempo: four-on-the-floor and breakbeats when fast, half-time and soft when slow."""
    return {"backbeat": 3.0, "four_on_the_floor": 2.0 + 2.0 * (bpm >= 110), "halftime": 1.0 + 2.0 * (bpm < 110),
            "breakbeat": 1.0 + (bpm >= 120), "soft": 1.0 + 3.0 * (bpm < 100)}


def _pitch_class(name: str) -> int:
    for names in (music.SHARP_NAMES, music.FLAT_NAMES):
        if name in names:
            return names.index(name)
    raise ValueError(f"key {name!r}: use a tonic such as C, F#, Eb")


def _quantized(value: float) -> float:
    """Velocities on a 1/20 grid, so repeated notes hit the per-clip note cache."""
    return round(float(np.clip(value, 0.05, 1.0)) * 20) / 20


def _render_notes(notes: list[music.Note], voice: instruments.Voice, length: int, samples_per_beat: float,
                  sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    track = np.zeros(length, dtype=np.float32)
    cache: dict[tuple[int, int, float], np.ndarray] = {}
    for note in notes:
        start = int(round(note.start * samples_per_beat))
        if start >= length:
            continue
        hold = max(1, int(round(note.length * samples_per_beat)))
        velocity = _quantized(note.velocity)
        cache_key = (note.midi, hold, velocity)
        if cache_key not in cache:
            cache[cache_key] = voice(instruments.midi_to_hz(note.midi), hold, sample_rate, velocity, rng) * velocity
        sound = cache[cache_key]
        end = min(length, start + len(sound))
        track[start:end] += sound[: end - start]
    return track


def _render_drums(hits: list[music.Hit], key: music.Key, length: int, samples_per_beat: float, sample_rate: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    kick_hz = instruments.midi_to_hz(29 + (key.tonic - 5) % 12)  # the tonic between F1 and E2 (44-82 Hz)
    snare_hz = instruments.midi_to_hz(52 + (key.tonic - 4) % 12)  # the tonic between E3 and D#4 (165-311 Hz)
    samples = {"kick": instruments.kick(sample_rate, rng, kick_hz),
               "snare": instruments.snare(sample_rate, rng, snare_hz),
               "hat": instruments.hihat(sample_rate, rng), "open_hat": instruments.hihat(sample_rate, rng, True)}
    tracks = {name: np.zeros(length, dtype=np.float32) for name in ("kick", "snare", "hat")}
    for hit in hits:
        start = int(round(hit.start * samples_per_beat))  # exact grid: no drift, at most half a sample of rounding
        if start >= length:
            continue
        sound = samples[hit.piece]
        end = min(length, start + len(sound))
        tracks["hat" if hit.piece == "open_hat" else hit.piece][start:end] += hit.velocity * sound[: end - start]
    return tracks


def _reverb(send: np.ndarray, seconds: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A small room: decaying, darkened noise impulse responses (different per side), applied by FFT convolution."""
    ir_length = int(seconds * sample_rate)
    t = np.arange(ir_length, dtype=np.float32) / np.float32(sample_rate)
    decay = np.exp(np.float32(-6.9 / seconds) * t)  # -60 dB at `seconds`
    irs = rng.standard_normal((2, ir_length)).astype(np.float32) * decay
    irs = signal.lfilter([0.35], [1.0, -0.65], irs, axis=-1).astype(np.float32)
    irs[:, : int(0.012 * sample_rate)] = 0.0  # pre-delay keeps attacks dry
    irs /= np.sqrt(np.sum(irs ** 2, axis=-1, keepdims=True))
    size = scipy.fft.next_fast_len(len(send) + ir_length, real=True)
    spectrum = scipy.fft.rfft(send, size)
    wet = scipy.fft.irfft(spectrum[None] * scipy.fft.rfft(irs, size, axis=-1), size, axis=-1)
    return wet[:, : len(send)].astype(np.float32)


def _pan_gains(pan: float) -> tuple[float, float]:
    angle = (pan + 1.0) * math.pi / 4.0  # constant power: equal loudness across the field
    return math.cos(angle), math.sin(angle)


def _set_level(track: np.ndarray, level_db: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(track, dtype=np.float64))))
    return track * np.float32(10.0 ** (level_db / 20.0) / rms) if rms > 1e-9 else track


def render_plan(plan: ClipPlan) -> np.ndarray:
    """The mixed stereo audio of a plan, float32 [2, samples], peak at -1 dBFS."""
    rng = np.random.default_rng([plan.seed, 2])
    sr = plan.sample_rate
    length = int(round(plan.seconds * sr))
    samples_per_beat = 60.0 * sr / plan.bpm
    chords = list(plan.chords)
    tracks: dict[str, np.ndarray] = {}
    for role, name in plan.parts.items():
        inst = instruments.INSTRUMENTS[name]
        voice = inst.voice
        if name == "organ":
            voice = functools.partial(instruments.organ, drawbars=plan.drawbars)
        if role == "drums":
            hits = music.drum_part(plan.drum_pattern, plan.num_bars, rng)
            tracks.update(_render_drums(hits, plan.key, length, samples_per_beat, sr, rng))
            continue
        if role == "melody":
            low, high = MELODY_RANGE[name]
            notes = music.melody(plan.key, chords, rng, first_bar=1 if plan.num_bars >= 4 else 0,
                                 total_beats=plan.seconds * plan.bpm / 60.0, low=low, high=high)
        elif role == "harmony":
            notes = music.comping(chords, plan.comping, rng)
        elif role == "texture":
            notes = music.comping(chords, "sustain", rng)
        else:
            notes = music.bass_line(chords, plan.bass_pattern, rng)
        track = _render_notes(notes, voice, length, samples_per_beat, sr, rng)
        if inst.lowpass_hz:
            b, a = signal.butter(2, inst.lowpass_hz, fs=sr)
            track = signal.lfilter(b, a, track).astype(np.float32)
        tracks[role] = track

    mix = np.zeros((2, length), dtype=np.float32)
    send = np.zeros(length, dtype=np.float32)
    for role, track in tracks.items():
        track = _set_level(track, TRACK_LEVEL_DB[role])
        left, right = _pan_gains(plan.pans[role])
        mix[0] += np.float32(left) * track
        mix[1] += np.float32(right) * track
        send += np.float32(REVERB_SEND[role]) * track
    if np.any(send):
        mix += np.float32(plan.reverb_mix) * _reverb(send, plan.reverb_seconds, sr, rng)
    fade_in, fade_out = int(FADE_IN_SECONDS * sr), int(FADE_OUT_SECONDS * sr)
    mix[:, :fade_in] *= np.linspace(0.0, 1.0, fade_in, dtype=np.float32)
    mix[:, length - fade_out:] *= np.linspace(1.0, 0.0, fade_out, dtype=np.float32)
    peak = float(np.max(np.abs(mix)))
    if peak > 0:
        mix *= np.float32(10.0 ** (PEAK_DBFS / 20.0) / peak)
    return mix


def attributes(plan: ClipPlan) -> dict[str, Any]:
    """JSON-ready description of what the clip contains (what an evaluator may check against the audio)."""
    return {
        "key": plan.key.name,
        "mode": plan.key.mode,
        "key_name": plan.key.spoken,
        "tonic_pitch_class": plan.key.tonic,
        "bpm": plan.bpm,
        "time_signature": "4/4",
        "bars": plan.num_bars,
        "instruments": plan.instruments,
        "parts": dict(plan.parts),
        "chords": [chord.symbol for chord in plan.chords],
        "progression": [plan.key.chord(degree).numeral for degree in plan.progression],
        "drum_pattern": plan.drum_pattern,
        "bass_pattern": plan.bass_pattern,
        "comping": plan.comping,
        "pan": {name: round(plan.pans[role if role != "drums" else "kick"], 2) for role, name in plan.parts.items()},
        "mood": plan.mood,
        "energy": plan.energy,
        "seconds": plan.seconds,
        "sample_rate": plan.sample_rate,
        "seed": plan.seed,
    }


def render_clip(seed: int, seconds: float = 10.0, sample_rate: int = 44100, **overrides: Any) -> Clip:
    """Plans and renders clip `seed`; overrides are plan_clip's keywords (bpm, key, mode, instruments_allowed, ...)."""
    plan = plan_clip(seed, seconds, sample_rate, **overrides)
    attrs = attributes(plan)
    text_rng = np.random.default_rng([seed, 1])
    text = captions.caption(attrs, text_rng)
    return Clip(render_plan(plan), sample_rate, attrs, text, captions.title(attrs, text_rng))
