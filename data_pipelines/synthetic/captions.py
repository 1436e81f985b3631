"""Captions and titles from a clip's attributes, with varied phrasing.

Every caption states the key and mode, the tempo in BPM and every instrument (each instrument's wording contains its
attribute name, e.g. "plucked guitar" for "guitar"), so a text encoder sees facts that are true of the audio.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ARTIST = "musicdiff synthetic"
LICENSE = "CC0-1.0"

MOODS = {
    ("major", "calm"): ("peaceful", "gentle", "serene"),
    ("major", "relaxed"): ("warm", "easygoing", "sunny"),
    ("major", "steady"): ("bright", "cheerful", "hopeful"),
    ("major", "upbeat"): ("happy", "bouncy", "playful"),
    ("major", "energetic"): ("triumphant", "euphoric", "lively"),
    ("minor", "calm"): ("melancholic", "wistful", "somber"),
    ("minor", "relaxed"): ("moody", "reflective", "bittersweet"),
    ("minor", "steady"): ("brooding", "mysterious", "pensive"),
    ("minor", "upbeat"): ("driving", "restless", "urgent"),
    ("minor", "energetic"): ("intense", "dark", "fierce"),
}

INSTRUMENT_WORDS = {
    "piano": ("piano", "grand piano", "acoustic piano"),
    "guitar": ("plucked guitar", "guitar", "picked guitar"),
    "bass": ("bass", "bass line", "electric bass"),
    "pad": ("warm pad", "synth pad", "pad"),
    "organ": ("organ", "drawbar organ"),
    "marimba": ("marimba", "wooden marimba"),
    "lead": ("synth lead", "lead synth"),
}
DRUM_WORDS = {
    "backbeat": ("drums", "backbeat drums", "a drum kit"),
    "four_on_the_floor": ("four-on-the-floor drums", "drums"),
    "halftime": ("half-time drums", "drums"),
    "breakbeat": ("breakbeat drums", "busy drums"),
    "soft": ("soft drums", "light drums"),
}
NOUNS = ("track", "piece", "tune", "instrumental", "song")

_TEMPLATES = (
    "{a_energy} {mood} {noun} in {key} at {bpm} BPM with {instruments}",
    "{Mood} {noun} for {instruments} in {key}, {bpm} BPM",
    "{Energy} {key} {noun} featuring {instruments}, {bpm} beats per minute",
    "{Instruments} in {key} at {bpm} BPM, {mood} and {energy}",
    "{a_mood} {bpm} BPM {noun} in {key}: {instruments}",
    "{Instruments} playing {a_energy} {mood} {noun} in {key} ({bpm} BPM), chords {chords}",
    "{bpm} BPM, {key}, {energy}: {a_mood} {noun} with {instruments}",
)


def mood_word(mode: str, energy: str, rng: np.random.Generator) -> str:
    options = MOODS[(mode, energy)]
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _choose(options: tuple[str, ...], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def instrument_phrase(attributes: dict[str, Any], rng: np.random.Generator) -> str:
    words = []
    for name in attributes["instruments"]:
        if name == "drums":
            words.append(_choose(DRUM_WORDS[attributes["drum_pattern"]], rng))
        else:
            words.append(_choose(INSTRUMENT_WORDS[name], rng))
    return _join(words)


def caption(attributes: dict[str, Any], rng: np.random.Generator) -> str:
    """One sentence naming the energy, mood, key, tempo and instruments; the template is drawn from `rng`."""
    template = _choose(_TEMPLATES, rng)
    instruments = instrument_phrase(attributes, rng)
    noun = _choose(NOUNS, rng)
    fields = {
        "energy": attributes["energy"], "Energy": attributes["energy"].capitalize(),
        "a_energy": _with_article(attributes["energy"]),
        "mood": attributes["mood"], "Mood": _with_article(attributes["mood"]).capitalize(),
        "a_mood": _with_article(attributes["mood"]),
        "key": attributes["key_name"], "bpm": attributes["bpm"], "noun": noun,
        "instruments": instruments, "Instruments": instruments[0].upper() + instruments[1:],
        "chords": "-".join(attributes["chords"][: len(attributes["progression"])]),
    }
    text = template.format(**fields)
    return text[0].upper() + text[1:]


_TITLE_ADJECTIVES = ("Amber", "Quiet", "Paper", "Silver", "Hollow", "Velvet", "Copper", "Distant", "Northern",
                     "Golden", "Lucid", "Faded", "Electric", "Midnight", "Open", "Glass", "Slow", "Bright")
_TITLE_NOUNS = ("Harbor", "Lanterns", "Orchard", "Signals", "Tides", "Meridian", "Circuit", "Letters", "Rooftops",
                "Compass", "Weather", "Gardens", "Satellites", "Rivers", "Mirrors", "Avenue", "Embers", "Fields")


def title(attributes: dict[str, Any], rng: np.random.Generator) -> str:
    """E.g. "Copper Tides (E-flat major)"; the key in the title keeps titles of different clips apart."""
    return f"{_choose(_TITLE_ADJECTIVES, rng)} {_choose(_TITLE_NOUNS, rng)} ({attributes['key_name']})"
