"""The caption step of curation: each removal reason with examples it must and must not catch.

The lingua detector costs ~4 s to build, so one module-scoped filter serves every language test;
lingua caches its models per process, which makes the second (("en", "de")) filter nearly free.
"""

from __future__ import annotations

import pytest

from data_pipeline.curate import caption_filters
from data_pipeline.curate.caption_filters import (
    CaptionFilter,
    CaptionFilterConfig,
    CaptionVerdict,
    caption_words,
    normalize_caption,
)

NO_LANGUAGE = CaptionFilterConfig(languages=None)


def reasons(captions: list[str], cfg: CaptionFilterConfig = NO_LANGUAGE) -> list[str | None]:
    return [v.reason for v in CaptionFilter(cfg).judge(captions)]


@pytest.fixture(scope="module")
def english_filter() -> CaptionFilter:
    return CaptionFilter(CaptionFilterConfig())


@pytest.fixture(scope="module")
def english_german_filter(english_filter: CaptionFilter) -> CaptionFilter:
    return CaptionFilter(CaptionFilterConfig(languages=("en", "de")))


# --- normalisation and word counts --------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("cafÃ©", "café"),  # UTF-8 read as Windows-1252
        ("  a  dog\t\non the\u00a0beach ", "a dog on the beach"),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("e\u0301clair", "\u00e9clair"),  # decomposed é -> NFC
        ("plain caption", "plain caption"),
    ],
)
def test_normalize_caption(raw: str, expected: str) -> None:
    assert normalize_caption(raw) == expected


def test_judge_returns_the_normalised_caption_only_when_asked() -> None:
    raw = "cafÃ©   on the   corner"
    assert CaptionFilter(NO_LANGUAGE).judge([raw])[0] == CaptionVerdict(
        "café on the corner", None, None
    )
    unchanged = CaptionFilterConfig(languages=None, normalize=False)
    assert CaptionFilter(unchanged).judge([raw])[0].caption == raw


def test_caption_words_splits_cjk_per_character() -> None:
    assert caption_words("a red  car") == ["a", "red", "car"]
    assert caption_words("iPhone手机壳。") == ["iPhone", "手", "机", "壳"]


def test_empty_captions() -> None:
    assert reasons(["", "   ", "\t\n", "\x00\x01"]) == ["empty caption"] * 4
    # Parquet caption columns have holes; None reads as an empty caption, not a crash.
    verdict = CaptionFilter(NO_LANGUAGE).judge([None])[0]
    assert verdict == CaptionVerdict("", "empty caption", None)


def test_word_count_limits() -> None:
    cfg = CaptionFilterConfig(languages=None, min_words=3, max_words=5)
    captions = ["red car", "a red car", "a small red car parked", "a small red car parked here"]
    got = reasons(captions, cfg)
    assert got == ["too few words", None, None, "too many words"]


def test_words_are_counted_after_normalisation() -> None:
    # Three words only once the no-break spaces count as spaces.
    cfg = CaptionFilterConfig(languages=None, min_words=3)
    assert reasons(["a\u00a0red\u00a0car"], cfg) == [None]


# --- boilerplate --------------------------------------------------------------------------------

ONE_WORD_OK = CaptionFilterConfig(languages=None, min_words=1)


@pytest.mark.parametrize(
    "caption",
    [
        "IMG_1234.jpg",
        "DSC00042",
        "image001.png",
        "Screenshot 2021-03-04 at 10.22.11",
        "Screen Shot 2020-01-01 at 1.23.45 PM.png",
        "my trip.jpg",
        "IMG-20190101-WA0001.jpeg",
        "P1010001.JPG",
        "download (3).jpg",
        "Picture 3",
    ],
)
def test_file_names_are_boilerplate(caption: str) -> None:
    assert reasons([caption], ONE_WORD_OK) == ["boilerplate: file name"]


@pytest.mark.parametrize(
    "caption",
    [
        "a photo of a dog",
        "I saved it as dog.jpg on my laptop",
        "saved as: dog.jpg",
        "Photo 1 of 12 from the harbour",
        "image of a cat on a sofa",
        "the img tag in html",
    ],
)
def test_sentences_are_not_file_names(caption: str) -> None:
    assert reasons([caption], ONE_WORD_OK) == [None]


def test_single_word_file_names_are_too_few_words_first() -> None:
    # Word counts run before boilerplate, so the default config names the cheaper reason.
    assert reasons(["IMG_1234.jpg"]) == ["too few words"]


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("product https://example.com/products/12345.jpg", "boilerplate: url"),
        ("www.example-shop.com - sale", "boilerplate: url"),
        ("Visit www.example.com for more photos of dogs", None),
        ("awww.so cute puppy", None),
        ("Click here to download the wallpaper", "boilerplate: download prompt"),
        ("Click to enlarge: red barn in winter", "boilerplate: download prompt"),
        ("Free download vector icons", "boilerplate: download prompt"),
        ("a hand clicking a computer mouse", None),
        ("an arrow icon for a download button", None),
        ("No image available", "boilerplate: placeholder"),
        ("Image not found", "boilerplate: placeholder"),
        ("product photo coming soon", "boilerplate: placeholder"),
        ("photo available in three sizes", None),
        ("Young woman smiling on the beach - stock photo", "boilerplate: stock photo"),
        ("Golden retriever puppy royalty-free image", "boilerplate: stock photo"),
        ("Mountain lake at dawn, Shutterstock", "boilerplate: stock photo"),
        ("a stock pot of soup on the stove", None),
        ("British royalty at a parade", None),
        ("sale sale sale sale", "boilerplate: repeated word"),
        ("Sale! SALE! sale! sale! now", "boilerplate: repeated word"),
        ("New York New York", None),  # 2 of 4 is not more than half
        ("ha ha ha", None),  # fewer than 4 words
        ("a dog and a cat on a mat", None),
    ],
)
def test_boilerplate_kinds(caption: str, reason: str | None) -> None:
    assert reasons([caption]) == [reason]


def test_boilerplate_can_be_turned_off() -> None:
    cfg = CaptionFilterConfig(languages=None, boilerplate=False)
    assert reasons(["sale sale sale sale", "No image available"], cfg) == [None, None]


def test_max_token_repeat_sets_the_share() -> None:
    cfg = CaptionFilterConfig(languages=None, max_token_repeat=0.3)
    assert reasons(["a dog and a cat"], cfg) == ["boilerplate: repeated word"]  # 2/5 > 0.3


# --- language -----------------------------------------------------------------------------------

FOREIGN = {
    "de": "Ein kleiner Hund spielt im Garten mit einem Ball",
    "fr": "Un petit chien joue dans le jardin avec une balle",
    "es": "Un perro pequeño juega en el jardín con una pelota",
    "zh": "一只小狗在花园里玩球",
}
ENGLISH = "a small dog playing with a ball in the garden"


def test_foreign_captions_removed_under_english(english_filter: CaptionFilter) -> None:
    verdicts = english_filter.judge([ENGLISH, *FOREIGN.values()])
    assert [(v.reason, v.language) for v in verdicts] == [
        (None, "en"),
        *((f"language: {code}", code) for code in FOREIGN),
    ]


def test_german_kept_when_asked(english_german_filter: CaptionFilter) -> None:
    verdicts = english_german_filter.judge([FOREIGN["de"], FOREIGN["fr"]])
    assert [(v.reason, v.language) for v in verdicts] == [(None, "de"), ("language: fr", "fr")]


def test_short_captions_skip_language_id(english_filter: CaptionFilter) -> None:
    # lingua scores "Pizza Margherita" 0.8 Italian; two words are too few to judge.
    assert english_filter.judge(["Pizza Margherita"])[0] == CaptionVerdict(
        "Pizza Margherita", None, None
    )


def test_uncertain_language_is_kept(english_filter: CaptionFilter) -> None:
    # Brand names: lingua's best guess is not English but well under 0.5 confidence.
    verdict = english_filter.judge(["Toyota Corolla 2015 silver sedan"])[0]
    assert (verdict.reason, verdict.language) == (None, None)


def test_script_no_detector_language_writes_is_unknown(english_filter: CaptionFilter) -> None:
    thai, digits = "สุนัข ตัวเล็ก เล่น ในสวน", "2019 - 2020 - 2021"
    verdicts = english_filter.judge([thai, digits])
    assert [(v.reason, v.language) for v in verdicts] == [("language: unknown", None), (None, None)]


def test_language_runs_only_on_captions_still_kept(english_filter: CaptionFilter) -> None:
    verdict = english_filter.judge(["Kostenloser Download Download Download Download"])[0]
    assert (verdict.reason, verdict.language) == ("boilerplate: repeated word", None)


def test_verdicts_keep_input_length_and_order(english_filter: CaptionFilter) -> None:
    captions = ["", FOREIGN["de"], ENGLISH, "red car", "sale sale sale sale", ENGLISH + " today"]
    verdicts = english_filter.judge(captions)
    assert [v.reason for v in verdicts] == [
        "empty caption",
        "language: de",
        None,
        None,
        "boilerplate: repeated word",
        None,
    ]
    assert [v.caption for v in verdicts[1:]] == captions[1:]
    assert english_filter.judge([]) == []


def test_no_languages_never_builds_a_detector(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoBuilder:
        def __getattr__(self, name: str):
            raise AssertionError("languages=None must not touch lingua")

    monkeypatch.setattr(caption_filters, "LanguageDetectorBuilder", NoBuilder())
    caption_filter = CaptionFilter(NO_LANGUAGE)
    assert caption_filter._detector is None
    assert caption_filter.judge([FOREIGN["de"]])[0] == CaptionVerdict(FOREIGN["de"], None, None)


# --- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_words": 5, "max_words": 4}, "max_words"),
        ({"min_words": 0}, "min_words"),
        ({"max_words": 2.5}, "max_words"),
        ({"languages": ("en", "xx")}, "languages"),
        ({"languages": ("EN",)}, "languages"),
        ({"languages": "en"}, "languages"),
        ({"languages": ()}, "languages"),
        ({"min_language_confidence": 1.5}, "min_language_confidence"),
        ({"max_token_repeat": 0}, "max_token_repeat"),
        ({"normalize": "false"}, "normalize"),
        ({"language_min_words": 0}, "language_min_words"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CaptionFilterConfig(**kwargs)


def test_config_accepts_a_list_of_languages() -> None:
    cfg = CaptionFilterConfig(languages=["en", "de", "en"])  # type: ignore[arg-type]
    assert cfg.languages == ("en", "de")
    hash(cfg)  # still usable as a key


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(TypeError):
        CaptionFilterConfig(min_word=3)  # type: ignore[call-arg]
