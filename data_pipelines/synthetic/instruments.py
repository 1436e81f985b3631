"""Synthesised instrument voices: each renders one note (or one drum hit) as a float32 mono array.

Every voice is a pure function of its arguments (noise comes from the caller's `np.random.Generator`), so a clip is
bit-identical for a seed. Periodic tones read band-limited wavetables built by inverse FFT (no aliasing, a few numpy ops
per sample); the piano and mallet sum inharmonic decaying partials; the guitar is Karplus-Strong computed one delay
period at a time, so its only Python loop runs once per period rather than once per sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import signal

TABLE_SIZE = 4096
_MAX_HARMONICS = 96


def midi_to_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


@functools.lru_cache(maxsize=512)
def _wavetable(shape: str, num_harmonics: int) -> np.ndarray:
    """One period of a band-limited waveform with harmonics 1..num_harmonics, peak-normalised."""
    k = np.arange(1, num_harmonics + 1, dtype=np.float64)
    if shape == "saw":
        amps = 1.0 / k
    elif shape == "pulse25":  # 25 % duty pulse: a hollower, nasal lead tone
        amps = np.abs(np.sin(np.pi * k * 0.25)) / k
    elif shape.startswith("drawbar:"):
        # Hammond order 16', 5 1/3', 8', 4', 2 2/3', 2', 1 3/5', 1 1/3', 1': harmonics of the 16' sub-octave.
        levels = [int(c) for c in shape.split(":", 1)[1]]
        amps = np.zeros_like(k)
        for level, harmonic in zip(levels, (1, 3, 2, 4, 6, 8, 10, 12, 16)):
            if harmonic <= num_harmonics and level:
                amps[harmonic - 1] = 10.0 ** ((level - 8) * 3.0 / 20.0)  # each drawbar step is 3 dB
    else:
        raise ValueError(f"unknown wavetable shape {shape!r}")
    spectrum = np.zeros(TABLE_SIZE // 2 + 1, dtype=np.complex128)
    spectrum[1:num_harmonics + 1] = -1j * amps
    table = np.fft.irfft(spectrum, n=TABLE_SIZE)
    return (table / np.max(np.abs(table))).astype(np.float32)


def _harmonics_below_nyquist(freq: float, sample_rate: int) -> int:
    return int(max(1, min(_MAX_HARMONICS, (0.45 * sample_rate) // freq)))


def wavetable_tone(shape: str, freq: float, length: int, sample_rate: int, vibrato_cents: float = 0.0,
                   vibrato_hz: float = 5.5, vibrato_delay: float = 0.25) -> np.ndarray:
    """Reads `shape` at `freq` Hz; the table's harmonic count keeps every partial below Nyquist."""
    table = _wavetable(shape, _harmonics_below_nyquist(freq, sample_rate))
    t = np.arange(length, dtype=np.float64) / sample_rate
    if vibrato_cents:
        depth = np.clip(t / vibrato_delay - 1.0, 0.0, 1.0) * vibrato_cents  # vibrato fades in after the attack
        inst_freq = freq * 2.0 ** (depth * np.sin(2 * np.pi * vibrato_hz * t) / 1200.0)
        phase = np.cumsum(inst_freq) / sample_rate
    else:
        phase = freq * t
    index = ((phase - np.floor(phase)) * TABLE_SIZE).astype(np.int32) & (TABLE_SIZE - 1)
    return table[index]


def envelope(length: int, sample_rate: int, hold: int, attack: float, decay: float, sustain: float,
             release: float) -> np.ndarray:
    """Linear ADSR: attack to 1, decay to `sustain`; from sample `hold` a linear fade to 0 over `release` s."""
    a = max(1.0, attack * sample_rate)
    d = max(1.0, decay * sample_rate)
    n = np.arange(length, dtype=np.float32)
    held = np.interp(n, [0.0, a, a + d], [0.0, 1.0, sustain])
    letting_go = np.clip(1.0 - (n - hold) / max(1.0, release * sample_rate), 0.0, 1.0)
    return (held * letting_go).astype(np.float32)


def _decaying_partials(freq: float, length: int, sample_rate: int, ratios: np.ndarray, amps: np.ndarray,
                       decays: np.ndarray) -> np.ndarray:
    """Sum of sines at freq*ratios with exponential decays (seconds); each stops once 60 dB down."""
    out = np.zeros(length, dtype=np.float32)
    nyquist = 0.5 * sample_rate
    for ratio, amp, tau in zip(ratios, amps, decays):
        if freq * ratio >= 0.95 * nyquist:
            continue
        n = min(length, int(tau * math.log(1000.0) * sample_rate) + 1)
        t = np.arange(n, dtype=np.float32) / np.float32(sample_rate)
        out[:n] += np.float32(amp) * np.exp(-t / np.float32(tau)) * np.sin(np.float32(2 * np.pi * freq * ratio) * t)
    return out


def _release_tail(note: np.ndarray, hold: int, sample_rate: int, release: float) -> np.ndarray:
    """Damps a freely ringing note after `hold` samples (a key or string let go)."""
    if hold < len(note):
        tail = np.arange(len(note) - hold, dtype=np.float32)
        note[hold:] *= np.exp(-tail / np.float32(release * sample_rate / 6.9))  # -60 dB after `release` s
    return note


# ---- pitched voices: (freq, hold samples, sample rate, velocity 0..1, rng) -> mono float32 ----------------------


def piano(freq: float, hold: int, sample_rate: int, velocity: float, rng: np.random.Generator) -> np.ndarray:
    """Stiff-string partials (slightly sharp, f_n = n f sqrt(1 + B n^2)) whose upper partials die away first."""
    length = hold + int(0.3 * sample_rate)
    n = np.arange(1, 13, dtype=np.float64)
    inharmonicity = 2.5e-4 * (freq / 261.6) ** 0.5
    ratios = n * np.sqrt(1.0 + inharmonicity * n ** 2)
    brightness = 1.0 + 1.5 * velocity  # harder strikes excite more upper partials
    amps = n ** -1.0 * np.exp(-(n - 1) / (2.0 * brightness))
    base_decay = float(np.clip(1.4 * (261.6 / freq) ** 0.6, 0.3, 4.0))
    decays = base_decay / (1.0 + 0.45 * (n - 1))
    note = _decaying_partials(freq, length, sample_rate, ratios, amps, decays)
    hammer = int(0.004 * sample_rate)
    note[:hammer] += 0.05 * velocity * rng.standard_normal(hammer).astype(np.float32) * np.linspace(
        1, 0, hammer, dtype=np.float32)
    note[: int(0.002 * sample_rate)] *= np.linspace(0, 1, int(0.002 * sample_rate), dtype=np.float32)
    return _release_tail(note, hold, sample_rate, 0.25)


def guitar(freq: float, hold: int, sample_rate: int, velocity: float, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong plucked string with a fractional-delay loop filter (exact pitch, no per-sample loop)."""
    length = hold + int(0.15 * sample_rate)
    period = sample_rate / freq
    # Loop taps at delay, delay + 1 and delay + 2 with weights (1 - frac, 1, frac) / 2: group delay = the period.
    delay = max(1, int(math.floor(period - 0.5)))
    frac = period - 0.5 - delay
    t60 = float(np.clip(3.0 * (196.0 / freq) ** 0.5, 0.6, 4.0))
    gain = 10.0 ** (-3.0 / (t60 * freq))  # loop gain per period for a -60 dB decay after t60 seconds
    taps = np.float32(gain) * np.array([0.5 * (1 - frac), 0.5, 0.5 * frac], dtype=np.float32)
    burst = rng.uniform(-1.0, 1.0, delay).astype(np.float32)
    # Softer plucks are darker: smooth the excitation more; the pluck-position comb hollows it like a real string.
    smoothing = 0.45 + 0.4 * (1.0 - velocity)
    burst = signal.lfilter([1.0 - smoothing], [1.0, -smoothing], burst).astype(np.float32)
    pluck = max(1, int(0.3 * delay))
    burst[pluck:] -= 0.7 * burst[:-pluck].copy()
    burst -= burst.mean()
    pad = delay + 2
    y = np.zeros(pad + length, dtype=np.float32)
    y[pad:pad + min(delay, length)] = burst[:length]
    for start in range(pad, pad + length, delay):
        end = min(start + delay, pad + length)
        span = end - start
        y[start:end] += (taps[0] * y[start - delay:start - delay + span]
                         + taps[1] * y[start - delay - 1:start - delay - 1 + span]
                         + taps[2] * y[start - delay - 2:start - delay - 2 + span])
    note = y[pad:] * np.float32(0.8)
    return _release_tail(note, hold, sample_rate, 0.12)


def bass(freq: float, hold: int, sample_rate: int, velocity: float, rng: np.random.Generator) -> np.ndarray:
    """Electric-style bass: a sine fundamental plus a saw whose upper harmonics decay quickly after the pluck."""
    length = hold + int(0.08 * sample_rate)
    body = wavetable_tone("saw", freq, length, sample_rate)
    t = np.arange(length, dtype=np.float32) / np.float32(sample_rate)
    cutoff = min(0.45 * sample_rate, freq * (1.0 + 2.0 * velocity))
    b, a = signal.butter(2, cutoff, fs=sample_rate)
    filtered = signal.lfilter(b, a, body).astype(np.float32)
    twang = np.exp(-t / np.float32(0.12))  # the brighter attack fades, leaving the round fundamental
    fundamental = np.sin(np.float32(2 * np.pi * freq) * t)
    note = (0.8 * fundamental + filtered * (0.2 + 0.6 * twang)).astype(np.float32)
    return note * envelope(length, sample_rate, hold, 0.004, 0.2, 0.85, 0.06)


def pad(freq: float, hold: int, sample_rate: int, velocity: float, rng: np.random.Generator) -> np.ndarray:
    """Three detuned saws (chorus beating) with a slow swell; the track gets a low-pass in the mix."""
    length = hold + int(0.8 * sample_rate)
    note = np.zeros(length, dtype=np.float32)
    for cents in (-9.0, 0.0, 8.0):
        note += wavetable_tone("saw", freq * 2.0 ** (cents / 1200.0), length, sample_rate)
    return note * envelope(length, sample_rate, hold, 0.45, 0.5, 0.8, 0.8) * np.float32(0.33)


def organ(freq: float, hold: int, sample_rate: int, velocity: float, rng: np.random.Generator,
          drawbars: str = "888000000") -> np.ndarray:
    """Tonewheel organ: fixed drawbar harmonic mix, instant on and off, a little rotary-speaker tremolo."""
    length = hold + int(0.04 * sample_rate)
    table = _wavetable(f"drawbar:{drawbars}", _harmonics_below_nyquist(freq / 2, sample_rate))
    t = np.arange(length, dtype=np.float64) / sample_rate
    phase = (freq / 2) * t
    note = table[((phase - np.floor(phase)) * TABLE_SIZE).astype(np.int32) & (TABLE_SIZE - 1)]
    tremolo = (1.0 - 0.12 * (0.5 + 0.5 * np.sin(2 * np.pi * 6.2 * t))).astype(np.float32)
    return note * tremolo * envelope(length, sample_rate, hold, 0.006, 0.01, 1.0, 0.03)


def marimba(freq: float, hold: int, sample_rate: int, velocity: float, rng: np.random.Generator) -> np.ndarray:
    """Struck wooden bar: partials tuned to 1, 4 and 10 times f (two octaves, three octaves and a third) with fast
    decays, the upper ones dying first."""
    length = hold + int(0.5 * sample_rate)
    ratios = np.array([1.0, 3.99, 9.95])
    amps = np.array([1.0, 0.35 * (0.5 + velocity), 0.12 * velocity])
    decay = float(np.clip(0.7 * (261.6 / freq) ** 0.5, 0.15, 1.2))
    decays = np.array([decay, decay * 0.22, decay * 0.08])
    note = _decaying_partials(freq, length, sample_rate, ratios, amps, decays)
    note[: int(0.001 * sample_rate)] *= np.linspace(0, 1, int(0.001 * sample_rate), dtype=np.float32)
    return note


def lead(freq: float, hold: int, sample_rate: int, velocity: float, rng: np.random.Generator) -> np.ndarray:
    """Synth lead: 25 % pulse wave with delayed vibrato, low-passed, quick attack."""
    length = hold + int(0.12 * sample_rate)
    tone = wavetable_tone("pulse25", freq, length, sample_rate, vibrato_cents=18.0)
    b, a = signal.butter(2, min(0.45 * sample_rate, freq * 8.0), fs=sample_rate)
    tone = signal.lfilter(b, a, tone).astype(np.float32)
    return tone * envelope(length, sample_rate, hold, 0.01, 0.15, 0.75, 0.1)


# ---- drum kit: one sample per piece, stamped onto the beat grid -------------------------------------------------


def kick(sample_rate: int, rng: np.random.Generator, tuning_hz: float = 50.0) -> np.ndarray:
    """Sine with a fast downward pitch sweep (about 150 Hz down to `tuning_hz`) and a short click.

    The body settles on `tuning_hz`, which the mix sets to the key's tonic (as producers tune kicks), so the drums
    add no pitch outside the key."""
    length = int(0.45 * sample_rate)
    t = np.arange(length, dtype=np.float64) / sample_rate
    start_hz = rng.uniform(130, 170)
    # The sweep glides in log frequency, so it is within 15 cents of the tuning after 0.1 s.
    inst_freq = tuning_hz * (start_hz / tuning_hz) ** np.exp(-t / 0.022)
    phase = 2 * np.pi * np.cumsum(inst_freq) / sample_rate
    body = np.sin(phase) * np.exp(-t / rng.uniform(0.12, 0.2))
    click = rng.standard_normal(length) * np.exp(-t / 0.002) * 0.3
    return (body + click).astype(np.float32)


def snare(sample_rate: int, rng: np.random.Generator, tuning_hz: float = 190.0) -> np.ndarray:
    """Drum-head modes at `tuning_hz` and its octave (tuned to the key like the kick) plus high-passed noise
    (the snare wires)."""
    length = int(0.3 * sample_rate)
    t = np.arange(length, dtype=np.float64) / sample_rate
    head = (np.sin(2 * np.pi * tuning_hz * t) + 0.3 * np.sin(2 * np.pi * tuning_hz * 2 * t)) * np.exp(-t / 0.05)
    b, a = signal.butter(2, 1500, btype="highpass", fs=sample_rate)
    wires = signal.lfilter(b, a, rng.standard_normal(length)) * np.exp(-t / rng.uniform(0.06, 0.1))
    return (0.5 * head + 0.8 * wires).astype(np.float32)


def hihat(sample_rate: int, rng: np.random.Generator, open_hat: bool = False) -> np.ndarray:
    """Metallic cluster of detuned square waves plus noise, high-passed; open hats ring longer."""
    length = int((0.35 if open_hat else 0.08) * sample_rate)
    t = np.arange(length, dtype=np.float64) / sample_rate
    metal = sum(np.sign(np.sin(2 * np.pi * f * t)) for f in (205.3, 304.4, 369.6, 522.7, 540.0, 800.0))
    noise = rng.standard_normal(length)
    b, a = signal.butter(2, 7000, btype="highpass", fs=sample_rate)
    tone = signal.lfilter(b, a, 0.5 * metal / 6 + noise)
    return (tone * np.exp(-t / (0.09 if open_hat else 0.018)) * 0.6).astype(np.float32)


Voice = Callable[[float, int, int, float, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Instrument:
    """A named voice. `label` is the caption wording; `lowpass_hz` filters the whole track in the mix."""

    name: str
    label: str
    voice: Voice | None  # None for the drum kit, which is rendered from its pieces
    lowpass_hz: float | None = None


INSTRUMENTS: dict[str, Instrument] = {
    "piano": Instrument("piano", "piano", piano),
    "guitar": Instrument("guitar", "plucked guitar", guitar),
    "bass": Instrument("bass", "bass", bass),
    "pad": Instrument("pad", "warm pad", pad, lowpass_hz=2500.0),
    "organ": Instrument("organ", "organ", organ),
    "marimba": Instrument("marimba", "marimba", marimba),
    "lead": Instrument("lead", "synth lead", lead),
    "drums": Instrument("drums", "drums", None),
}
PITCHED_INSTRUMENTS = tuple(name for name, inst in INSTRUMENTS.items() if inst.voice is not None)
