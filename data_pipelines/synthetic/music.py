"""Music theory for the synthetic clips: keys, diatonic chords, progressions, melodies, bass lines, comping, drums.

Everything is in beats of a 4/4 bar (a quarter note is one beat); the renderer turns beats into samples at the clip's
tempo. Progressions start on the tonic chord and minor keys use the harmonic-minor dominant (a major V with the raised
leading tone), so the key and mode can be heard rather than only stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

BEATS_PER_BAR = 4
SHARP_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
# Tonics (pitch classes) whose conventional key signature uses flats; the rest are spelled with sharps.
FLAT_TONICS = {"major": {1, 3, 5, 8, 10}, "minor": {0, 2, 3, 5, 7, 10}}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII")
MODES = ("major", "minor")

# Scale-degree progressions (0 = tonic), all opening on the tonic; diminished chords are left out.
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 3), (0, 5, 3, 4), (0, 3, 0, 4), (0, 1, 4, 0), (0, 2, 3, 4), (0, 4, 3, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 4), (0, 3, 6, 2), (0, 5, 3, 4), (0, 3, 0, 4), (0, 6, 3, 4)),
}


class Note(NamedTuple):
    start: float  # beats from the clip start
    length: float  # beats
    midi: int
    velocity: float  # 0..1


class Hit(NamedTuple):
    start: float  # beats
    piece: str  # "kick" | "snare" | "hat" | "open_hat"
    velocity: float


@dataclass(frozen=True)
class Chord:
    root: int  # pitch class
    quality: str  # "" major | "m" minor
    numeral: str  # roman numeral relative to the key, e.g. "vi"
    symbol: str  # e.g. "F#m"

    @property
    def pitch_classes(self) -> tuple[int, int, int]:
        third = 3 if self.quality == "m" else 4
        return self.root, (self.root + third) % 12, (self.root + 7) % 12


@dataclass(frozen=True)
class Key:
    tonic: int  # pitch class, 0 = C
    mode: str  # "major" | "minor"

    def spell(self, pitch_class: int) -> str:
        names = FLAT_NAMES if self.tonic in FLAT_TONICS[self.mode] else SHARP_NAMES
        return names[pitch_class % 12]

    @property
    def name(self) -> str:
        """The tonic as written in attributes, e.g. "Eb"."""
        return self.spell(self.tonic)

    @property
    def spoken(self) -> str:
        """The key as a caption says it, e.g. "E-flat major"."""
        tonic = self.name.replace("b", "-flat").replace("#", "-sharp")
        return f"{tonic} {self.mode}"

    @property
    def scale(self) -> tuple[int, ...]:
        return tuple((self.tonic + step) % 12 for step in SCALES[self.mode])

    def chord(self, degree: int) -> Chord:
        steps = SCALES[self.mode]
        root = steps[degree % 7]
        third = (steps[(degree + 2) % 7] - root) % 12
        if self.mode == "minor" and degree % 7 == 4:
            third = 4  # harmonic-minor dominant: the raised leading tone pulls back to the tonic
        quality = "m" if third == 3 else ""
        numeral = ROMAN[degree % 7] if quality == "" else ROMAN[degree % 7].lower()
        root_pc = (self.tonic + root) % 12
        return Chord(root_pc, quality, numeral, self.spell(root_pc) + quality)


def chords_per_bar(key: Key, progression: tuple[int, ...], total_beats: float) -> list[Chord]:
    """The progression cycled, one chord a bar, ending on the tonic chord; when the clip stops in the first half
    of its last bar the bar before is the tonic too, so the final chord is long enough to hear."""
    num_bars = math.ceil(total_beats / BEATS_PER_BAR - 1e-9)
    chords = [key.chord(progression[bar % len(progression)]) for bar in range(num_bars)]
    if num_bars >= 3:
        chords[-1] = key.chord(0)
        if num_bars >= 4 and total_beats - (num_bars - 1) * BEATS_PER_BAR < BEATS_PER_BAR / 2:
            chords[-2] = key.chord(0)
    return chords


def _nearest_midi(pitch_class: int, target: float) -> int:
    base = int(round(target)) - 6
    return base + (pitch_class - base) % 12


# ---- parts ------------------------------------------------------------------------------------------------------

# Melody rhythm cells per half bar, in eighth notes (negative = rest); each sums to 4 eighths.
_MELODY_CELLS = ((2, 2), (1, 1, 2), (2, 1, 1), (1, 1, 1, 1), (3, 1), (4,), (-2, 2), (2, -1, 1), (-1, 1, 2))
_MELODY_CELL_WEIGHTS = np.array([4, 3, 3, 2, 2, 2, 1, 1, 1], dtype=np.float64)


def melody(key: Key, chords: list[Chord], rng: np.random.Generator, first_bar: int, total_beats: float,
           low: int = 60, high: int = 84) -> list[Note]:
    """A stepwise line in the key's scale: a chord tone on the first note of each half bar (the tonic triad's
    tones preferred), scale steps between, each two-bar phrase and the clip's last audible note on the tonic.
    Over a minor key's V chord the raised seventh replaces the natural one."""
    scale_midis = [m for m in range(low, high + 1) if m % 12 in key.scale]
    tonic_triad = key.chord(0).pitch_classes
    home = min((i for i, m in enumerate(scale_midis) if m % 12 == key.tonic),
               key=lambda i: abs(scale_midis[i] - (low + high) / 2))
    position = home
    weights = _MELODY_CELL_WEIGHTS / _MELODY_CELL_WEIGHTS.sum()
    notes: list[Note] = []
    for bar in range(first_bar, len(chords)):
        chord = chords[bar]
        for half in range(2):
            cell = _MELODY_CELLS[rng.choice(len(_MELODY_CELLS), p=weights)]
            beat = bar * BEATS_PER_BAR + half * 2.0
            for index, eighths in enumerate(cell):
                duration = abs(eighths) / 2.0
                if eighths > 0 and beat < total_beats:
                    phrase_end = half == 1 and index == len(cell) - 1 and bar % 2 == 1
                    if index == 0 or phrase_end:
                        position = _chord_tone(scale_midis, chord, tonic_triad, key.tonic, position, rng, phrase_end)
                    else:
                        pull = -1 if position > home + 3 else (1 if position < home - 3 else 0)
                        step = int(rng.choice([-2, -1, 1, 2], p=[0.15, 0.35, 0.35, 0.15])) + pull
                        position = int(np.clip(position + step, 0, len(scale_midis) - 1))
                    midi = scale_midis[position]
                    if key.mode == "minor" and chord.numeral == "V" and midi % 12 == (key.tonic + 10) % 12:
                        midi += 1
                    accent = 0.85 if index == 0 else 0.7
                    velocity = float(np.clip(accent + rng.normal(0, 0.05), 0.3, 1.0))
                    notes.append(Note(beat, duration * 0.92, midi, velocity))
                beat += duration
    if notes:  # resolve: the last audible note becomes the tonic nearest to it, held to the end
        last = notes[-1]
        final_length = max(last.length, total_beats - last.start)
        notes[-1] = Note(last.start, final_length, _nearest_midi(key.tonic, last.midi), 0.8)
    return notes


def _chord_tone(scale_midis: list[int], chord: Chord, tonic_triad: tuple[int, ...], tonic: int, position: int,
                rng: np.random.Generator, phrase_end: bool) -> int:
    """Index of a chord tone near `position`; tones shared with the tonic triad (the tonic most) weigh more, and at
    a phrase end the tonic itself is taken whenever it belongs to the chord."""
    candidates = [i for i, m in enumerate(scale_midis) if m % 12 in chord.pitch_classes and abs(i - position) <= 4]
    if not candidates:
        candidates = [min((i for i, m in enumerate(scale_midis) if m % 12 in chord.pitch_classes),
                          key=lambda i: abs(i - position))]
    if phrase_end and any(scale_midis[i] % 12 == tonic for i in candidates):
        return min((i for i in candidates if scale_midis[i] % 12 == tonic), key=lambda i: abs(i - position))
    weights = np.array([np.exp(-abs(i - position) / 2.0) * (3.0 if scale_midis[i] % 12 == tonic else
                        1.5 if scale_midis[i] % 12 in tonic_triad else 1.0) for i in candidates])
    return candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]


BASS_PATTERNS = {
    # (start eighth, length eighths, interval above the root in semitones)
    "whole": ((0, 8, 0),),
    "halves": ((0, 4, 0), (4, 4, 7)),
    "root_fifth": ((0, 2, 0), (2, 2, 7), (4, 2, 12), (6, 2, 7)),
    "pulse": tuple((i, 1, 0) for i in range(8)),
    "syncopated": ((0, 3, 0), (3, 1, 0), (4, 2, 7), (6, 2, 12)),
    "arpeggiated": ((0, 2, 0), (2, 2, 4), (4, 2, 7), (6, 2, 12)),
}


def bass_line(chords: list[Chord], pattern: str, rng: np.random.Generator) -> list[Note]:
    """Root-based bass in the octave C2..B2, one pattern repeated per bar; every note is a chord tone (the third
    follows the chord quality), so the line never leaves the key."""
    notes = []
    for bar, chord in enumerate(chords):
        root = 36 + chord.root
        for start, length, interval in BASS_PATTERNS[pattern]:
            if interval == 4 and chord.quality == "m":
                interval = 3
            velocity = (0.9 if start == 0 else 0.75) + float(rng.normal(0, 0.03))
            notes.append(Note(bar * BEATS_PER_BAR + start / 2.0, length / 2.0 * 0.9, root + interval, velocity))
    return notes



def voicing(chord: Chord, previous_center: float, low: int = 52, high: int = 72) -> list[int]:
    """The close-position triad inside [low, high] whose centre is nearest the previous one (smooth voice leading)."""
    options = []
    for bass_pc in chord.pitch_classes:
        order = list(chord.pitch_classes)
        order = order[order.index(bass_pc):] + order[:order.index(bass_pc)]
        for octave in range(low // 12, high // 12 + 1):
            midis = [octave * 12 + order[0]]
            for pc in order[1:]:
                midis.append(midis[-1] + (pc - midis[-1]) % 12)
            if midis[0] >= low and midis[-1] <= high:
                options.append(midis)
    return min(options, key=lambda m: (abs(float(np.mean(m)) - previous_center), m[0]))


def comping(chords: list[Chord], pattern: str, rng: np.random.Generator) -> list[Note]:
    """The chords played in a rhythm: held, in halves or quarters, as an eighth-note arpeggio, or offbeat stabs."""
    notes = []
    center = 62.0
    for bar, chord in enumerate(chords):
        tones = voicing(chord, center)
        center = float(np.mean(tones))
        bar_start = bar * BEATS_PER_BAR
        if pattern == "arpeggio":
            order = tones + [tones[0] + 12]
            for i in range(8):
                velocity = (0.75 if i % 2 == 0 else 0.6) + float(rng.normal(0, 0.03))
                notes.append(Note(bar_start + i / 2.0, 0.5, order[(0, 1, 2, 3, 2, 1, 0, 1)[i]], velocity))
            continue
        if pattern == "sustain":
            hits = ((0.0, 4.0),)
        elif pattern == "halves":
            hits = ((0.0, 1.9), (2.0, 1.9))
        elif pattern == "quarters":
            hits = tuple((float(b), 0.8) for b in range(4))
        else:  # offbeat stabs on the "and" of every beat
            hits = tuple((b + 0.5, 0.35) for b in range(4))
        for start, length in hits:
            velocity = (0.75 if start in (0.0, 2.0) else 0.62) + float(rng.normal(0, 0.03))
            notes.extend(Note(bar_start + start, length, midi, velocity) for midi in tones)
    return notes


# Drum patterns on a sixteenth-note grid of one bar: piece -> steps (0..15).
DRUM_PATTERNS = {
    "backbeat": {"kick": (0, 8, 10), "snare": (4, 12), "hat": (0, 2, 4, 6, 8, 10, 12, 14)},
    "four_on_the_floor": {"kick": (0, 4, 8, 12), "snare": (4, 12), "hat": (0, 4, 8, 12), "open_hat": (2, 6, 10, 14)},
    "halftime": {"kick": (0, 3, 10), "snare": (8,), "hat": (0, 2, 4, 6, 8, 10, 12, 14)},
    "breakbeat": {"kick": (0, 6, 10), "snare": (4, 12, 15), "hat": tuple(range(16))},
    "soft": {"kick": (0, 8), "snare": (4, 12), "hat": (0, 4, 8, 12)},
}
# Loudness of each pattern's groove, for the energy word in captions.
DRUM_INTENSITY = {"soft": 0, "halftime": 1, "backbeat": 1, "four_on_the_floor": 2, "breakbeat": 2}


def drum_part(pattern: str, num_bars: int, rng: np.random.Generator) -> list[Hit]:
    """The pattern on every bar, quarter-note hats accented, the snare quieter in the soft groove."""
    hits = []
    for bar in range(num_bars):
        for piece, steps in DRUM_PATTERNS[pattern].items():
            for step in steps:
                accent = 1.0 if step % 4 == 0 else 0.7
                if piece == "snare" and pattern == "soft":
                    accent *= 0.5
                velocity = float(np.clip(accent * (0.9 + rng.normal(0, 0.04)), 0.2, 1.0))
                hits.append(Hit(bar * BEATS_PER_BAR + step / 4.0, piece, velocity))
    return hits
