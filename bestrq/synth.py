"""Offline synthetic English speech with known transcripts: espeak-ng (ctypes) + seeded grammar."""

from __future__ import annotations

import _ctypes
import ctypes
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ENGLISH_VOICES",
    "EspeakError",
    "EspeakSynthesizer",
    "SpeakerStyle",
    "available_voices",
    "generate_sentences",
    "make_speakers",
    "voice_sharing",
]

# Values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_ESPEAK_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EE_OK = 0

# English language voices and "!v" variants bundled with espeak-ng-data; the variant is
# appended as "<lang>+<variant>". Checked against the packaged data by available_voices().
_ENGLISH_LANGS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
_VARIANTS = ("", "f1", "f2", "f3", "f4", "m1", "m2", "m3", "m4", "m5", "m7")
ENGLISH_VOICES: tuple[str, ...] = tuple(
    lang + (f"+{var}" if var else "") for var in _VARIANTS for lang in _ENGLISH_LANGS
)


class EspeakError(RuntimeError):
    """espeak-ng could not be loaded, initialised, or refused a voice/text."""


# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); events unused -> void*.
_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Engine:
    """The process-wide espeak-ng library: its C state is global, so one instance only.

    espeak-ng carries state from one utterance to the next (the wave generator's gain control,
    cycle counters, resonator memories), so the same call gave other samples, even another
    length, depending on what was spoken before. The library is therefore unloaded and loaded
    again before every utterance: each one is then a function of its own text and voice alone,
    whatever the order, the process or the utterances around it (about 3 ms each).
    """

    _instance: _Engine | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - declared dependency
            raise EspeakError("the espeakng-loader package is required for synthesis") from exc
        self.lib_path = espeakng_loader.get_library_path()
        self.data_path = espeakng_loader.get_data_path()
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes callbacks are freed when garbage-collected.
        self._callback = _CALLBACK_TYPE(self._on_audio)
        self.lib: ctypes.CDLL | None = None
        self._load()

    def _load(self) -> None:
        try:
            lib = ctypes.CDLL(self.lib_path)
        except OSError as exc:
            raise EspeakError(f"cannot load espeak-ng library {self.lib_path}: {exc}") from exc
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK_TYPE]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_Terminate.argtypes = []
        lib.espeak_Terminate.restype = ctypes.c_int
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode("utf-8"), 0
        )
        if rate <= 0:
            raise EspeakError(f"espeak_Initialize failed (data path {self.data_path})")
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib
        self.sample_rate = int(rate)

    def _reload(self) -> None:
        """Unload the library (its static state goes with it) and load it afresh."""
        if self.lib is not None:
            self.lib.espeak_Terminate()
            _ctypes.dlclose(self.lib._handle)
            self.lib = None
        self._load()

    @classmethod
    def get(cls) -> _Engine:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav: ctypes._Pointer, num_samples: int, _events: int) -> int:
        if wav and num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        with self._lock:
            self._reload()
            assert self.lib is not None
            if self.lib.espeak_SetVoiceByName(voice.encode("utf-8")) != _EE_OK:
                raise EspeakError(f"espeak-ng has no voice {voice!r}")
            self.lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
            self._chunks = []
            data = text.encode("utf-8") + b"\0"
            buf = ctypes.create_string_buffer(data, len(data))
            status = self.lib.espeak_Synth(
                buf, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
            )
            if status != _EE_OK:
                raise EspeakError(f"espeak_Synth failed with status {status} for {text!r}")
            self.lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks)  # (samples,) int16


def _has_breath(variant_file: Path) -> bool:
    """Whether a voice variant adds breath noise, which espeak-ng 1.52 draws differently in
    every process (measured: 5 processes, 5 different outputs for f2 and f3, identical bytes
    for every other variant), so it could not give a reproducible corpus."""
    lines = variant_file.read_text(encoding="utf-8", errors="replace").splitlines()
    return any(line.split()[:1] == ["breath"] for line in lines)


def available_voices() -> list[str]:
    """The ENGLISH_VOICES whose language and variant files exist in the bundled espeak-ng-data,
    less the variants with breath noise (not reproducible, see `_has_breath`)."""
    import espeakng_loader

    data = Path(espeakng_loader.get_data_path())
    langs = {p.name.lower() for p in (data / "lang").rglob("*") if p.is_file()}
    variants = {p.name for p in (data / "voices" / "!v").iterdir() if not _has_breath(p)}
    out = []
    for voice in ENGLISH_VOICES:
        lang, _, var = voice.partition("+")
        if lang in langs and (not var or var in variants):
            out.append(voice)
    return out


class EspeakSynthesizer:
    """Text to speech with espeak-ng (library initialised once per process)."""

    def __init__(self) -> None:
        self._engine = _Engine.get()

    @property
    def sample_rate(self) -> int:
        """Native output rate reported by espeak_Initialize (typically 22050 Hz)."""
        return self._engine.sample_rate

    def synthesize(
        self, text: str, voice: str = "en-us", rate: int = 160, pitch: int = 50
    ) -> tuple[np.ndarray, int]:
        """Speak `text`; returns (float32 audio in [-1, 1] of shape (samples,), sample rate)."""
        if not 80 <= rate <= 450:
            raise ValueError(f"rate must be within 80..450 words per minute, got {rate}")
        if not 0 <= pitch <= 100:
            raise ValueError(f"pitch must be within 0..100, got {pitch}")
        pcm = self._engine.synthesize(text, voice, rate, pitch)  # (samples,) int16
        audio = pcm.astype(np.float32) / 32768.0  # (samples,)
        return audio, self.sample_rate


@dataclass(frozen=True)
class SpeakerStyle:
    """One synthetic "speaker": an espeak voice with its own speaking rate and pitch."""

    name: str
    voice: str
    rate: int
    pitch: int


def make_speakers(n: int, seed: int) -> list[SpeakerStyle]:
    """`n` speakers cycling through the bundled English voices (in a seeded order); rate
    120-200, pitch 30-70. Beyond the number of voices, speaker i speaks with speaker
    i - len(voices)'s voice (`voice_sharing` says so in words)."""
    if n < 1:
        raise ValueError(f"number of speakers must be >= 1, got {n}")
    rng = random.Random(f"speakers-{seed}")
    voices = available_voices() or ["en-us"]
    voices = rng.sample(voices, len(voices))
    return [
        SpeakerStyle(
            name=f"spk{i:03d}",
            voice=voices[i % len(voices)],
            rate=rng.randint(120, 200),
            pitch=rng.randint(30, 70),
        )
        for i in range(n)
    ]


def voice_sharing(speakers: list[SpeakerStyle]) -> str | None:
    """None when every speaker has a voice of its own, else one line saying how they share:
    how many voices speak for how many speakers, an example, and that the split keeps a
    voice's speakers together."""
    by_voice: dict[str, list[str]] = {}
    for spk in speakers:
        by_voice.setdefault(spk.voice, []).append(spk.name)
    shared = {v: names for v, names in by_voice.items() if len(names) > 1}
    if not shared:
        return None
    voice, names = next(iter(shared.items()))
    most = max(len(n) for n in shared.values())
    return (f"{len(speakers)} speakers, {len(by_voice)} espeak voices: {len(shared)} voices "
            f"speak for {sum(len(n) for n in shared.values())} speakers (up to {most} each, "
            f"with other rates and pitches; e.g. {voice}: {', '.join(names)}); segment keeps "
            "the speakers of one voice in one split, so splits are disjoint by voice")


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    """A word list written as one string (keeps the vocabulary readable)."""
    return tuple(w.strip() for w in text.split(sep) if w.strip())


# --- sentence grammar --------------------------------------------------------------------

_NAMES = _words(
    "anna peter maria john lucy david sarah tom emma oliver grace henry alice samuel clara "
    "george nina oscar ruth victor"
)

_PEOPLE = _words(
    "teacher|doctor|farmer|baker|driver|neighbour|student|pilot|painter|nurse|sailor|writer|"
    "captain|gardener|singer|engineer|child|old man|young woman|shopkeeper|musician|soldier|"
    "judge|cook",
    "|",
)

_ANIMALS = _words("dog cat horse bird fox rabbit cow sheep goat owl duck mouse bear wolf")

_THINGS = _words(
    "book letter basket window door table chair lamp river boat bridge garden house road train "
    "bicycle apple bread cup key map coat hat box bottle flower tree stone song story picture "
    "clock candle bell ship wall fence shoe ring newspaper piano kettle blanket ladder wagon "
    "mirror pencil guitar radio envelope"
)

_ADJECTIVES = _words(
    "small large old new red green blue yellow quiet noisy bright dark heavy light warm cold "
    "broken shiny wooden tall short happy tired clever gentle strange famous empty full heavy "
    "beautiful simple careful brave lonely busy soft rough ancient"
)

_ADVERBS = _words(
    "slowly quickly quietly carefully happily suddenly often never always rarely gladly nearly "
    "almost finally calmly"
)

# "present/past" pairs of transitive verbs.
_VERBS = tuple(
    tuple(pair.split("/"))
    for pair in _words(
        "opens/opened closes/closed carries/carried finds/found brings/brought paints/painted "
        "cleans/cleaned sells/sold buys/bought watches/watched follows/followed repairs/repaired "
        "reads/read writes/wrote moves/moved drops/dropped hides/hid holds/held builds/built "
        "loses/lost counts/counted describes/described remembers/remembered forgets/forgot "
        "visits/visited greets/greeted likes/liked wants/wanted sees/saw hears/heard"
    )
)

# "present/past" pairs of intransitive verbs.
_INTRANSITIVE = tuple(
    tuple(pair.split("/"))
    for pair in _words(
        "sleeps/slept waits/waited laughs/laughed sings/sang walks/walked runs/ran smiles/smiled "
        "arrives/arrived leaves/left works/worked listens/listened rests/rested"
    )
)

_PREPOSITIONS = _words("in near behind under beside inside outside across around past")

_PLACES = _words(
    "the kitchen|the market|the station|the old church|the harbour|the forest|the village|"
    "the school|the library|the museum|the hospital|the park|the small farm|the mountain|"
    "the valley|the city|the bakery|the hotel|the factory|the castle|the island|the garden|"
    "the square|the bridge",
    "|",
)

_TIMES = _words(
    "in the morning|at night|every day|last week|on sunday|after dinner|before noon|"
    "in the evening|yesterday|today|this afternoon|in winter|in the summer|next year|"
    "on monday|at dawn",
    "|",
)

_CONNECTORS = _words("and but because while so although when")

_UNITS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)

_TENS = ("", "", *_words("twenty thirty forty fifty sixty seventy eighty ninety"))

_QUESTION_WORDS = _words("why where when how")


def _number_words(n: int) -> str:
    """English words for 0 <= n < 1000 (e.g. 342 -> "three hundred and forty two")."""
    if n < 20:
        return _UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _TENS[tens] + (f" {_UNITS[unit]}" if unit else "")
    hundreds, rest = divmod(n, 100)
    head = f"{_UNITS[hundreds]} hundred"
    return head + (f" and {_number_words(rest)}" if rest else "")


def _base_form(third_person: str) -> str:
    """Undo the third-person -s: "carries" -> "carry", "watches" -> "watch", "opens" -> "open"."""
    if third_person.endswith("ies"):
        return third_person[:-3] + "y"
    if third_person.endswith(("ches", "shes", "sses", "xes")):
        return third_person[:-2]
    return third_person[:-1]


class _Grammar:
    """A tiny random phrase-structure grammar; every choice goes through one seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, seq: tuple) -> object:
        return self.rng.choice(seq)

    def noun_phrase(self) -> str:
        r = self.rng.random()
        if r < 0.2:
            return str(self.pick(_NAMES))
        noun = str(self.pick(_PEOPLE + _ANIMALS + _THINGS))
        det = str(self.pick(("the", "the", "a", "my", "her", "his", "our", "their", "this")))
        if det == "a" and noun[0] in "aeiou":
            det = "an"
        if r < 0.35:
            count = self.rng.randint(2, 120)
            plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
            if noun.endswith("y") and noun[-2] not in "aeiou":
                plural = noun[:-1] + "ies"
            return f"{_number_words(count)} {plural}"
        if self.rng.random() < 0.5:
            adj = str(self.pick(_ADJECTIVES))
            if det == "an" or (det == "a" and adj[0] in "aeiou"):
                det = "an" if adj[0] in "aeiou" else "a"
            return f"{det} {adj} {noun}"
        return f"{det} {noun}"

    def subject(self) -> str:
        if self.rng.random() < 0.3:
            return str(self.pick(_NAMES))
        noun = str(self.pick(_PEOPLE + _ANIMALS))
        adj = f"{self.pick(_ADJECTIVES)} " if self.rng.random() < 0.4 else ""
        return f"the {adj}{noun}"

    def clause(self) -> str:
        past = self.rng.random() < 0.5
        words = [self.subject()]
        if self.rng.random() < 0.25:
            words.append(str(self.pick(_ADVERBS)))
        if self.rng.random() < 0.7:
            verb = self.pick(_VERBS)
            words.append(verb[1] if past else verb[0])  # type: ignore[index]
            words.append(self.noun_phrase())
        else:
            verb = self.pick(_INTRANSITIVE)
            words.append(verb[1] if past else verb[0])  # type: ignore[index]
        if self.rng.random() < 0.5:
            words.append(f"{self.pick(_PREPOSITIONS)} {self.pick(_PLACES)}")
        if self.rng.random() < 0.35:
            words.append(str(self.pick(_TIMES)))
        return " ".join(words)

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.12:
            # Short question: "where did the baker find the key?"
            qword = self.pick(_QUESTION_WORDS)
            verb = self.pick(_VERBS)
            base = _base_form(str(verb[0]))  # type: ignore[index]
            return f"{qword} did {self.subject()} {base} {self.noun_phrase()}?"
        text = self.clause()
        n_extra = self.rng.choice((0, 0, 1, 1, 2))
        for _ in range(n_extra):
            sep = "," if self.rng.random() < 0.5 else ""
            text += f"{sep} {self.pick(_CONNECTORS)} {self.clause()}"
        if self.rng.random() < 0.15:
            text = f"{self.pick(('yes', 'well', 'today', 'later', 'then'))}, {text}"
        end = "!" if self.rng.random() < 0.08 else "."
        return text + end


def generate_sentences(n: int, seed: int) -> list[str]:
    """`n` English sentences from the project's seeded grammar (deterministic for a seed).

    Lowercase words with normal punctuation, about 4 to 20 words each.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"sentences-{seed}")
    grammar = _Grammar(rng)
    out: list[str] = []
    while len(out) < n:
        sentence = grammar.sentence()
        if 4 <= len(sentence.split()) <= 20:
            out.append(sentence)
    return out


def long_talk(seconds: float, seed: int, min_pause: float = 0.15, max_pause: float = 1.2,
              snr_db: float = 15.0, sample_rate: int = 16000
              ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A long recording with known utterance boundaries, for measuring cutters: espeak
    utterances of a few voices (each peaking at 0.5) with pauses of `min_pause` to `max_pause`
    seconds, over white noise plus a slowly varying 50 Hz hum (so that the quietest frame need
    not be a pause) at `snr_db` below the speech. Returns the audio at `sample_rate` and each
    utterance's (start, end) sample."""
    from bestrq.audio import resample

    rng = np.random.default_rng(seed)
    synth, speakers = EspeakSynthesizer(), make_speakers(6, seed)
    parts: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for i, text in enumerate(generate_sentences(max(1, int(seconds)), seed)):
        if at >= seconds * sample_rate:
            break
        pause = np.zeros(int(rng.uniform(min_pause, max_pause) * sample_rate), np.float32)
        spk = speakers[i % len(speakers)]
        audio, rate = synth.synthesize(text, voice=spk.voice, rate=spk.rate, pitch=spk.pitch)
        audio = resample(np.asarray(audio, np.float32), rate, sample_rate)
        parts += [pause, 0.5 * audio / (np.abs(audio).max() + 1e-9)]
        spans.append((at + len(pause), at + len(pause) + len(audio)))
        at += len(pause) + len(audio)
    clean = np.concatenate(parts)  # (samples,)
    power = np.mean(np.concatenate([clean[a:b] for a, b in spans]) ** 2)
    t = np.arange(len(clean)) / sample_rate
    noise = rng.standard_normal(len(clean)) + 2 * np.sin(2 * np.pi * 50 * t) * (
        1 + 0.8 * np.sin(2 * np.pi * t / 7.0))
    noise *= np.sqrt(power / 10 ** (snr_db / 10) / np.mean(noise**2))
    return (clean + noise).astype(np.float32), spans
