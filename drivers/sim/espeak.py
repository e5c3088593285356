"""Speech with phoneme timings from the espeak-ng library, through ctypes.

The command line gives no phoneme timings; the library does, as `espEVENT_PHONEME` events
carrying each phoneme's mnemonic and its `audio_position` (ms), when it is initialised with
`espeakINITIALIZE_PHONEME_EVENTS`. espeak-ng (GPL-3, Debian package `espeak-ng`) is a tool
of the corpus generator only: nothing the node runs at its call sites loads it.

The library keeps global state, so one `Espeak` per process; it is not thread-safe.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

from fusion_node.errors import FusionError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_END = 5
_EVENT_PHONEME = 7
_RATE = 1
_PITCH = 3
_RANGE = 4
_WORDGAP = 7
# Where Debian and upstream builds keep the data, if espeak_Info does not say.
_DATA_PATHS = (Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data"),
               Path("/usr/share/espeak-ng-data"), Path("/usr/local/share/espeak-ng-data"))


class EspeakError(FusionError):
    """espeak-ng is missing or refused a request."""


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p),
                ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))


@dataclass(frozen=True)
class Phoneme:
    """One phoneme: espeak's mnemonic and its start in the utterance's audio (seconds)."""

    name: str
    start_s: float


@dataclass(frozen=True)
class Utterance:
    """Mono float32 samples in [-1, 1] at `sample_rate`, with phoneme and word timings."""

    samples: np.ndarray
    sample_rate: int
    phonemes: tuple[Phoneme, ...]
    words: tuple[tuple[int, float], ...]  # (text position, start in seconds)


class Espeak:
    """The espeak-ng library in synchronous mode with phoneme events.

    One per process: the library has a single synth callback, so a second instance would
    take the first one's audio. `Espeak()` returns that one instance.
    """

    _instance: Self | None = None

    def __new__(cls) -> Self:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
            cls._instance._initialise()
        return cls._instance

    def _initialise(self) -> None:
        name = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
        try:
            self._lib = ctypes.CDLL(name)
        except OSError as exc:
            raise EspeakError(f"espeak-ng library not found ({exc}); install the Debian "
                              "package espeak-ng (scripts/setup.sh --test does)") from None
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, None,
            _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise EspeakError(f"espeak_Initialize failed ({self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        self._phonemes: list[Phoneme] = []
        self._words: list[tuple[int, float]] = []
        # Kept on self: ctypes must not free the callback while the library holds it.
        self._callback = _CALLBACK(self._on_synth)
        lib.espeak_SetSynthCallback(self._callback)
        self._variants: tuple[str, ...] | None = None

    @property
    def data_path(self) -> Path:
        """The espeak-ng-data folder the library reads."""
        path = ctypes.c_char_p()
        self._lib.espeak_Info(ctypes.byref(path))
        candidates = ((Path(path.value.decode()),) if path.value else ()) + _DATA_PATHS
        for candidate in candidates:
            if (candidate / "voices" / "!v").is_dir():
                return candidate
        raise EspeakError(f"no espeak-ng-data folder with voices/!v among "
                          f"{', '.join(map(str, candidates))}")

    def variants(self) -> tuple[str, ...]:
        """The voice variants installed (file names in espeak-ng-data/voices/!v; they are
        case-sensitive: `Annie` exists, `annie` does not)."""
        if self._variants is None:
            folder = self.data_path / "voices" / "!v"
            self._variants = tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))
        return self._variants

    def select_voice(self, voice: str) -> None:
        """Make `voice` ("lang" or "lang+variant") current; EspeakError unless it exists (for
        an unknown variant espeak-ng would silently speak with its default one)."""
        language, plus, variant = voice.partition("+")
        if plus and variant not in self.variants():
            raise EspeakError(f"espeak-ng has no voice {voice!r}: no variant {variant!r} "
                              f"(names are case-sensitive); installed variants: "
                              f"{', '.join(self.variants())}")
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise EspeakError(f"espeak-ng has no voice {voice!r}: it refuses the language "
                              f"{language!r}")

    def _on_synth(self, wav: ctypes.POINTER(ctypes.c_short), count: int,  # type: ignore[valid-type]
                  events: ctypes.POINTER(_Event)) -> int:  # type: ignore[valid-type]
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                name = event.id.string.decode("ascii", "replace")
                self._phonemes.append(Phoneme(name, event.audio_position / 1000.0))
            elif event.type == _EVENT_WORD and event.text_position > 0:
                # Text positions count from 1. espeak-ng sometimes ends an utterance with a
                # word event at position 0, at the end of the audio: no word of the text.
                self._words.append((event.text_position, event.audio_position / 1000.0))
            i += 1
        return 0

    def synthesise(self, text: str, voice: str = "en", rate_wpm: int = 175,
                   pitch: int = 50, pitch_range: int = 50) -> Utterance:
        """Speak `text` with `voice` (e.g. "en-us+f2"); pitch and range are 0-100."""
        lib = self._lib
        self.select_voice(voice)
        for parameter, value in ((_RATE, rate_wpm), (_PITCH, pitch), (_RANGE, pitch_range),
                                 (_WORDGAP, 0)):
            lib.espeak_SetParameter(parameter, value, 0)
        self._chunks, self._phonemes, self._words = [], [], []
        data = text.encode() + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None,
                                  None)
        if status != 0:
            raise EspeakError(f"espeak_Synth failed ({status}) for {text!r}")
        samples = (np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16))
        return Utterance(samples.astype(np.float32) / 32768.0, self.sample_rate,
                         tuple(self._phonemes), tuple(self._words))
