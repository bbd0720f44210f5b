"""The caption step of the curation stage: drop alt texts that cannot teach CLIP about their image.

`CaptionFilter(cfg).judge(captions)` returns one `CaptionVerdict` per caption, in input order.
The checks run cheapest first and stop at the first failure:

    empty -> normalise (ftfy) -> word counts -> boilerplate -> language

so lingua, by far the costliest, only sees the captions that are still kept. The reasons are short
fixed strings ("too few words", "boilerplate: url", "language: de") so a curation report can
count them with a plain Counter.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import ftfy
from lingua import IsoCode639_1, Language, LanguageDetector, LanguageDetectorBuilder

KNOWN_LANGUAGE_CODES = frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())

# The languages lingua chooses among (plus whichever ones are kept): the common languages of web
# alt text. Measured on this machine (2 shared cores, lingua 2.1.1, high-accuracy mode):
#   from_all_languages(), preloaded:       10.2 s, 1.3 GB RSS, ~740 captions/s
#   from_all_languages(), lazy:             0 s to build, 15 s and 960 MB on the first 200 captions
#   from_all_languages(), low accuracy:     0.1 GB, ~2,900 captions/s, but 2 of 16 plain English
#                                           captions came out Swedish / Norwegian
#   these 20, preloaded:                    3.3-4.2 s, 520 MB RSS, ~3,200 captions/s
#   30 (these + da nb fi hu ro el he th hi bg): 5.4 s, 780 MB, and English confidence drops further
# Beyond cost, all 75 languages spread a short caption's confidence thin: on 16 hand-written
# English alt texts the mean top confidence was 0.40 (vs 0.70 with these 20). A caption in a
# language outside the set is scored against its nearest neighbours in the set (Bulgarian reads as
# "ru", Norwegian as a weak "sv"); one in a script none of them writes scores 0 for all of them.
DETECTOR_LANGUAGES = (
    "en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "uk",
    "cs", "sv", "tr", "id", "vi", "ja", "zh", "ko", "ar", "fa",
)  # fmt: skip

# Chinese and Japanese are written without spaces, so a whitespace split calls a whole Chinese
# sentence one word; counting each ideograph/kana as a word keeps them from all being removed as
# "too few words" (a Chinese word is 1-2 characters, so the limits stay about right). Thai, Lao,
# Khmer and Burmese also go without spaces but their letters are not words: not handled.
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_OR_RUN = re.compile(rf"[{_CJK}]|[^{_CJK}]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
_EDGE_PUNCTUATION = re.compile(r"^\W+|\W+$")

# --- boilerplate ------------------------------------------------------------------------------
_IMAGE_EXTENSION = r"\.(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|heic|heif|avif|svg)"
# The whole caption is a file name: web CMSs fill a missing alt text with the uploaded file's name.
# Either (a) nothing but file-name characters ending in an image extension, spaces allowed because
# file names have them ("my trip.jpg"); sentence punctuation (: ; ! ? /) is left out so that
# "saved as: dog.jpg" is not one; or (b) a camera / OS default name, with or without extension.
_FILE_NAME = re.compile(
    rf"[\w\-.,()\[\]'+&~# ]{{1,120}}{_IMAGE_EXTENSION}"
    r"|(?:"
    # IMG_1234, DSC00042, P1010001, PXL_20210304_102211, IMG-20190101-WA0001
    r"(?:img|dsc[nf]?|dcim|pxl|mvimg|gopr|sam|wp|p)[_\-]?\d{3,}(?:[_\-][a-z0-9]+)*"
    # image001, Picture 3, untitled-1, download (3)
    r"|(?:image|img|photo|pic|picture|untitled|unnamed|download|scan|screenshot)"
    r"[_\- ]?\(?\d+\)?"
    # Screenshot 2021-03-04 at 10.22.11 AM, Screen Shot 2020-01-01 at 1.23.45 PM
    r"|screen[ _]?shot[ _\-]+\d{4}-?\d{2}-?\d{2}[\w .,:\-]*"
    rf")(?: ?\(\d+\))?(?:{_IMAGE_EXTENSION})?",
    re.IGNORECASE,
)
_URL = re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)


def _phrases(*patterns: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b", re.IGNORECASE)


# Each list stays short on purpose: a phrase earns its place by naming page furniture, never
# something a photo could show ("a hand clicking a mouse", "a stock pot" must stay clean). A
# caption that contains one anywhere is dropped, since the rest of such alt text is usually the
# page's, not the image's ("Click to enlarge - Item 4411").
_PROMPT_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Buttons and links around the image, not the image.
    (
        "download prompt",
        _phrases(
            r"click\s+(?:here|to\s+(?:enlarge|zoom|view|download|see|expand|open))",
            r"(?:click|tap)\s+(?:on\s+)?(?:the\s+)?(?:image|photo|picture|thumbnail)\s+(?:to|for)",
            r"free\s+download",
            r"download\s+(?:free|now|here)",
            r"view\s+(?:larger|full[\s-]size)\s+(?:image|photo|picture)",
        ),
    ),
    # The image itself is a grey "no image" tile, so even a correct caption cannot match it.
    (
        "placeholder",
        _phrases(
            r"no\s+(?:image|photo|picture|preview|thumbnail)s?\s+(?:available|found)",
            r"(?:image|photo|picture|preview|thumbnail)s?\s+(?:is\s+)?"
            r"(?:not\s+(?:available|found)|unavailable|coming\s+soon)",
            r"placeholder\s+(?:image|photo)",
            r"(?:image|photo)\s+placeholder",
        ),
    ),
    # Agency previews carry a big watermark across the image; CLIP then learns to read the
    # watermark. The captions themselves are often good, which is why this is its own kind.
    (
        "stock photo",
        _phrases(
            r"stock\s+(?:photo(?:graph(?:y)?)?|image|picture|illustration|vector|footage)s?",
            r"royalty[\s-]free",
            r"shutterstock|istock(?:photo)?|alamy|dreamstime|depositphotos|123rf"
            r"|getty\s*images|adobe\s+stock",
        ),
    ),
)


@dataclass(frozen=True)
class CaptionFilterConfig:
    """What the caption step removes. Every caption that survives is returned normalised.

    `min_language_confidence`: a caption is removed for its language ("language: de") only when
    lingua's top language is not kept AND has at least this confidence; below it the language is
    undetermined (`language=None`) and the caption is kept. Why lenient: lingua's confidences for
    alt-text-length captions are low even when right - on 50 hand-written English alt texts, 15
    had an English confidence < 0.5 and the 3 whose top language was wrong ("Toyota Corolla 2015
    silver sedan" -> sv) were all < 0.3, while German/French/Spanish sentences scored 0.65-0.99.
    The one "language: unknown" removal: a caption with letters that none of the detector's
    languages writes (Thai, Greek, Hindi...), which cannot be in a kept language either.

    `language_min_words`: shorter captions skip language id (kept, `language=None`). Two words are
    mostly names and loanwords: "Pizza Margherita" scored 0.81 Italian, "Golden Gate" Dutch.
    """

    min_words: int = 2  # fewer -> "too few words"
    max_words: int = 80  # more -> "too many words"
    boilerplate: bool = True  # "boilerplate: <kind>"
    normalize: bool = True  # ftfy + NFC + whitespace collapse (see normalize_caption)
    languages: tuple[str, ...] | None = ("en",)  # ISO 639-1 codes to keep; None = no language id
    min_language_confidence: float = 0.5
    language_min_words: int = 3
    # One word making up more than this share of a caption's (>= 4) words: "boilerplate: repeated
    # word". 0.5 keeps "New York New York" and removes "sale sale sale sale".
    max_token_repeat: float = 0.5

    def __post_init__(self) -> None:
        for name in ("min_words", "max_words", "language_min_words"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_words < self.min_words:
            raise ValueError(
                f"max_words ({self.max_words}) must be >= min_words ({self.min_words})"
            )
        for name in ("boilerplate", "normalize"):
            if not isinstance(getattr(self, name), bool):
                # A YAML/CLI "false" string would otherwise be truthy and silently enable it.
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name, low_open in (("min_language_confidence", False), ("max_token_repeat", True)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not (0 < value <= 1 if low_open else 0 <= value <= 1):
                bounds = "(0, 1]" if low_open else "[0, 1]"
                raise ValueError(f"{name} must be in {bounds}, got {value!r}")
        if self.languages is not None:
            if isinstance(self.languages, str) or not isinstance(self.languages, (tuple, list)):
                raise ValueError(
                    f"languages must be a tuple of ISO 639-1 codes or None, got {self.languages!r}"
                )
            if not self.languages:
                raise ValueError("languages must not be empty; use None to skip language id")
            unknown = [c for c in self.languages if c not in KNOWN_LANGUAGE_CODES]
            if unknown:
                raise ValueError(
                    f"languages has codes lingua does not know: {unknown} (use lowercase ISO"
                    f" 639-1 codes, one of {sorted(KNOWN_LANGUAGE_CODES)})"
                )
            # Config files hand us lists; a frozen config must hold a hashable tuple.
            object.__setattr__(self, "languages", tuple(dict.fromkeys(self.languages)))


@dataclass(frozen=True)
class CaptionVerdict:
    caption: str  # normalised when cfg.normalize, else as given
    reason: str | None  # None = kept
    language: str | None  # lowercase ISO 639-1 code; None when not run or undetermined


def normalize_caption(text: str) -> str:
    """Repair mojibake ("cafÃ©" -> "café") and HTML entities, NFC, one space between words."""
    # ftfy already ends in NFC by default; said again so that one visible caption is one string
    # (exact-duplicate checks, the tokenizer) whatever ftfy's defaults become.
    fixed = unicodedata.normalize("NFC", ftfy.fix_text(text))
    return " ".join(fixed.split())


def caption_words(text: str) -> list[str]:
    """Whitespace-separated words, with each CJK ideograph or kana counted as a word of its own."""
    words: list[str] = []
    for token in text.split():
        if _CJK_CHAR.search(token) is None:
            words.append(token)
            continue
        # "iPhone手机壳" -> ["iPhone", "手", "机", "壳"]; a lone "。" is punctuation, no word.
        for piece in _CJK_OR_RUN.findall(token):
            if _CJK_CHAR.fullmatch(piece) or any(ch.isalnum() for ch in piece):
                words.append(piece)
    return words


def boilerplate_kind(caption: str, words: Sequence[str], max_token_repeat: float) -> str | None:
    """The kind of boilerplate `caption` (normalised, split into `words`) is, or None if clean."""
    if _FILE_NAME.fullmatch(caption):
        return "file name"
    url_chars = sum(len(url) for url in _URL.findall(caption))
    if url_chars and 2 * url_chars > len("".join(caption.split())):
        return "url"  # more than half of the caption's non-space characters are URLs
    for kind, pattern in _PROMPT_KINDS:
        if pattern.search(caption):
            return kind
    # Punctuation-only tokens ("-", "|") are separators, not words, for the repeat share.
    bare = [_EDGE_PUNCTUATION.sub("", w).casefold() for w in words]
    bare = [w for w in bare if w]
    if len(bare) >= 4:
        _, top_count = Counter(bare).most_common(1)[0]
        if top_count > max_token_repeat * len(bare):
            return "repeated word"
    return None


class CaptionFilter:
    def __init__(self, cfg: CaptionFilterConfig):
        self.cfg = cfg
        self._keep = frozenset(cfg.languages or ())
        # Built once and preloaded: ~4 s and ~520 MB here (see DETECTOR_LANGUAGES), paid at
        # construction rather than inside the first batch. lingua caches models per process, so a
        # second CaptionFilter with the same languages builds in well under a millisecond.
        # judge() end to end on 20k alt texts here: ~1,800 captions/s with ("en",), ~8,300/s
        # with languages=None (ftfy is most of that; lingua most of the former).
        self._detector: LanguageDetector | None = None
        if cfg.languages is not None:
            codes = dict.fromkeys((*DETECTOR_LANGUAGES, *cfg.languages))
            self._detector = (
                LanguageDetectorBuilder.from_iso_codes_639_1(
                    *(IsoCode639_1.from_str(code) for code in codes)
                )
                .with_preloaded_language_models()
                .build()
            )

    def judge(self, captions: Sequence[str | None]) -> list[CaptionVerdict]:
        """One verdict per caption, in order. None counts as empty (parquet holes)."""
        verdicts: list[CaptionVerdict] = []
        needs_language: list[int] = []  # indices of kept captions long enough for language id
        for caption in captions:
            verdict, n_words = self._judge_text(caption)
            if verdict.reason is None and self._detector is not None:
                if n_words >= self.cfg.language_min_words:
                    needs_language.append(len(verdicts))
            verdicts.append(verdict)
        if needs_language:
            texts = [verdicts[i].caption for i in needs_language]
            for i, (language, reason) in zip(needs_language, self._languages_of(texts)):
                verdicts[i] = CaptionVerdict(verdicts[i].caption, reason, language)
        return verdicts

    def _judge_text(self, caption: str | None) -> tuple[CaptionVerdict, int]:
        """The verdict of every check but language, and the caption's word count."""
        if caption is None or not caption.strip():
            return CaptionVerdict(caption or "", "empty caption", None), 0
        if self.cfg.normalize:
            caption = normalize_caption(caption)
            if not caption:  # only control characters, which ftfy removes
                return CaptionVerdict(caption, "empty caption", None), 0
        words = caption_words(caption)
        if len(words) < self.cfg.min_words:
            return CaptionVerdict(caption, "too few words", None), len(words)
        if len(words) > self.cfg.max_words:
            return CaptionVerdict(caption, "too many words", None), len(words)
        if self.cfg.boilerplate:
            kind = boilerplate_kind(caption, words, self.cfg.max_token_repeat)
            if kind is not None:
                return CaptionVerdict(caption, f"boilerplate: {kind}", None), len(words)
        return CaptionVerdict(caption, None, None), len(words)

    def _languages_of(self, texts: list[str]) -> list[tuple[str | None, str | None]]:
        """(language, reason) per text; see CaptionFilterConfig for the rule."""
        assert self._detector is not None
        # Spreads the batch over lingua's Rust thread pool (all idle cores); results keep order.
        ranked = self._detector.compute_language_confidence_values_in_parallel(texts)
        results: list[tuple[str | None, str | None]] = []
        for text, values in zip(texts, ranked):
            top = values[0] if values else None
            if top is None or top.value == 0.0:
                # No detector language writes these letters, so no kept language does either;
                # a caption without letters ("2019 - 2020") has no language to judge.
                has_letters = any(ch.isalpha() for ch in text)
                results.append((None, "language: unknown" if has_letters else None))
            elif top.value < self.cfg.min_language_confidence:
                results.append((None, None))
            else:
                code = top.language.iso_code_639_1.name.lower()
                results.append((code, None if code in self._keep else f"language: {code}"))
        return results
