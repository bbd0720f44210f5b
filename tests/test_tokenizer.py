"""Tokenizer: our trained byte-level BPE, and CLIP's BPE rebuilt on `tokenizers` checked against
a small pure-Python reference of CLIP's algorithm (normalise, split, byte symbols, greedy
lowest-rank merges) on a synthetic merges file."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import pickle
import re
import tarfile
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch

from training.text.tokenizer import Tokenizer, main, pad_batch, train_tokenizer

CAPTIONS = [
    "A red circle on a blue background",
    "Two green   squares,\tside by side",
    "a small yellow triangle!!",
    "THE BIG PURPLE STAR",
    "three orange hexagons in a row",
    "it's a cyan ellipse, isn't it?",
    "café naïve 2024 façade",
] * 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tokenizer, Path]:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer(CAPTIONS, vocab_size=400, out_path=path, context_length=16), path


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


# -- our byte-level BPE -------------------------------------------------------------------------


def test_trained_tokenizer_ids_and_round_trip(trained):
    tok, _ = trained
    # the corpus saturates before 400: every pair that occurs twice got merged
    assert 300 < tok.vocab_size <= 400
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2)
    for caption in set(CAPTIONS) | {"Unseen words: zebra & QUOKKA 99% 😀"}:
        ids = tok.encode(caption)
        assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id
        assert tok.eot_id not in ids[1:-1] and tok.pad_id not in ids
        if len(ids) < tok.context_length:
            assert tok.decode(ids) == _clean(caption)
    # merges were learned: frequent words are single tokens
    assert len(tok.encode("red circle")) <= 4


def test_truncation_keeps_eot(trained):
    tok, _ = trained
    ids = tok.encode("one two three four five six seven eight nine ten eleven twelve " * 3)
    assert len(ids) == tok.context_length == 16
    assert ids[0] == tok.sot_id and ids[-1] == tok.eot_id


def test_special_token_text_is_not_special(trained):
    tok, _ = trained
    ids = tok.encode("a red <|endoftext|> circle")
    assert ids.count(tok.eot_id) == 1 and ids[-1] == tok.eot_id
    assert tok.sot_id not in tok.encode("<|startoftext|>")[1:]


def test_batch_padding_dynamic_and_fixed(trained):
    tok, _ = trained
    texts = ["a red circle", "three orange hexagons in a row", "star"]
    ids = [tok.encode(t) for t in texts]
    batch = tok(texts)
    longest = max(map(len, ids))
    assert batch.dtype == torch.long and batch.shape == (3, longest)
    for row, seq in zip(batch, ids, strict=True):
        assert row[: len(seq)].tolist() == seq
        assert (row[len(seq) :] == tok.pad_id).all()
    assert tok(texts, pad_to=16).shape == (3, 16)
    assert torch.equal(tok(texts, pad_to=16)[:, :longest], batch)
    with pytest.raises(ValueError):
        tok(texts, pad_to=longest - 1)
    # the collate path: only the pad id needed
    assert torch.equal(pad_batch(ids, tok.pad_id), batch)
    assert torch.equal(Tokenizer.pad_batch(ids, tok.pad_id, 16), tok(texts, pad_to=16))
    assert torch.equal(tok("star"), tok(["star"]))


def test_saved_json_reloads_identically(trained, tmp_path):
    tok, path = trained
    again = Tokenizer.from_file(path, context_length=16)
    assert (again.vocab_size, again.sot_id, again.eot_id, again.pad_id) == (
        tok.vocab_size,
        tok.sot_id,
        tok.eot_id,
        tok.pad_id,
    )
    assert again.encode_batch(CAPTIONS[:7]) == tok.encode_batch(CAPTIONS[:7])


def test_pickled_tokenizer_behaves_the_same(trained):
    # DataLoader workers get the tokenizer (or its bound encode) pickled.
    tok, _ = trained
    again = pickle.loads(pickle.dumps(tok.encode))
    text = "a red <|endoftext|> circle, two green squares side by side"
    assert again(text) == tok.encode(text)
    assert again.__self__.context_length == tok.context_length


def test_cli_trains_on_webdataset_shards(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
            for i, caption in enumerate(CAPTIONS[:70]):
                for ext, data in (("txt", caption.encode()), ("jpg", b"\xff\xd8 not an image")):
                    info = tarfile.TarInfo(f"{shard:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    main(["--shards", str(shards), "--vocab-size", "300"])
    out = capsys.readouterr().out
    assert "vocab size: " in out and "median tokens/caption" in out
    tok = Tokenizer.from_file(shards / "tokenizer.json")
    assert tok.encode("a red circle")[-1] == tok.eot_id


# -- CLIP BPE against a pure-Python reference --------------------------------------------------


def ref_bytes_to_unicode() -> dict[int, str]:
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def ref_normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


def ref_pretokenize(text: str) -> list[str]:
    """CLIP's split pattern as a scanner: contractions | letter run | one digit | symbol run."""
    kind = lambda c: "space" if c.isspace() else unicodedata.category(c)[0]  # noqa: E731
    pieces, i = [], 0
    while i < len(text):
        c = text[i]
        contraction = next(
            (s for s in ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d") if text.startswith(s, i)),
            None,
        )
        if contraction:
            j = i + len(contraction)
        elif kind(c) == "space":
            i += 1
            continue
        elif kind(c) == "L":
            j = i + 1
            while j < len(text) and kind(text[j]) == "L":
                j += 1
        elif kind(c) == "N":
            j = i + 1
        else:
            j = i + 1
            while j < len(text) and kind(text[j]) not in ("space", "L", "N"):
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def ref_word_symbols(word: str) -> list[str]:
    b2u = ref_bytes_to_unicode()
    symbols = [b2u[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return symbols


def ref_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:], strict=False)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def ref_train_merges(corpus: list[str], num_merges: int) -> list[tuple[str, str]]:
    words = Counter(
        tuple(ref_word_symbols(w)) for text in corpus for w in ref_pretokenize(ref_normalize(text))
    )
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        rank = {best: 0}
        words = Counter({tuple(ref_merge(list(w), rank)): f for w, f in words.items()})
    return merges


def ref_clip_encoder(merges):
    base = list(ref_bytes_to_unicode().values())
    vocab = (
        base
        + [b + "</w>" for b in base]
        + ["".join(m) for m in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    encoder = {t: i for i, t in enumerate(vocab)}
    ranks = {m: i for i, m in enumerate(merges)}

    def encode(text: str) -> list[int]:
        ids = [encoder["<|startoftext|>"]]
        for word in ref_pretokenize(ref_normalize(text)):
            ids += [encoder[s] for s in ref_merge(ref_word_symbols(word), ranks)]
        return ids + [encoder["<|endoftext|>"]]

    return encoder, encode


MERGE_CORPUS = [
    "the cat sat on the mat",
    "the bookkeeper's books",
    "aaa aaaa aaaaa",
    "café café naïve",
    "it's the cat's hat, isn't it",
    "2024 2025 1999!!! ???",
    "日本 日本語",
    "hello... hello!!",
    "a photograph of the quick brown fox jumps over the lazy dog",
    "tokenizers are fun to test",
] * 3
PROBE_TEXTS = [
    "The Cat sat on THE mat.",
    "  bookkeeper's\tbooks\n\nare   here ",
    "aaaaaaa aa a",
    "Café, naïve façade",
    "it's, isn't, we'll, they'd, I'm, you've, we're",
    "abc123def 2024!!!",
    "''s quoted 'hello' !'s",
    "日本語のテキスト",
    "emoji 😀😀 ok",
    "x",
    "",
    "   ",
    "mixed-case HeLLo... WORLD?!",
    "a\u0301 decomposed accent",
]


@pytest.fixture(scope="module")
def clip_bpe(tmp_path_factory):
    merges = ref_train_merges(MERGE_CORPUS, 100)
    assert len(merges) == 100 and any(len("".join(m)) > 4 for m in merges)
    root = tmp_path_factory.mktemp("clip_bpe")
    path = root / "bpe_synthetic.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"bpe_synthetic.txt#version: 0.2\n' + "\n".join(" ".join(m) for m in merges) + "\n")
    return merges, path, root


def test_clip_bpe_matches_reference(clip_bpe):
    merges, path, _ = clip_bpe
    encoder, ref_encode = ref_clip_encoder(merges)
    tok = Tokenizer.from_clip_bpe(path)
    assert tok.vocab_size == len(encoder) == 512 + 100 + 2
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (len(encoder) - 2, len(encoder) - 1, 0)
    for text in PROBE_TEXTS:
        assert tok.encode(text) == ref_encode(text), text
    assert tok.encode_batch(PROBE_TEXTS) == [ref_encode(t) for t in PROBE_TEXTS]
    # multi-symbol merges were exercised, not just bytes
    assert any(i >= 512 for i in tok.encode("the bookkeeper's cat"))


def test_clip_bpe_decode_truncate_and_save(clip_bpe, tmp_path):
    _, path, _ = clip_bpe
    tok = Tokenizer.from_clip_bpe(path, context_length=6)
    assert tok.decode(tok.encode("The cat SAT")) == "the cat sat"
    assert tok.decode(tok.encode("café, naïve")) == "café , naïve"  # CLIP decodes word by word
    ids = tok.encode("the cat sat on the mat again and again")
    assert len(ids) == 6 and ids[-1] == tok.eot_id
    batch = tok(["the cat", "the cat sat on the mat"])
    short = len(tok.encode("the cat"))
    assert short < 6 and batch.shape == (2, 6)
    assert batch[0, short:].eq(0).all()  # OpenCLIP's pad id
    tok.save(tmp_path / "clip.json")
    again = Tokenizer.from_file(tmp_path / "clip.json", context_length=77)
    assert (again.sot_id, again.eot_id, again.pad_id, again.vocab_size) == (
        tok.sot_id,
        tok.eot_id,
        tok.pad_id,
        tok.vocab_size,
    )
    assert again.encode_batch(PROBE_TEXTS) == Tokenizer.from_clip_bpe(path).encode_batch(
        PROBE_TEXTS
    )


def test_clip_bpe_hf_layout(clip_bpe, tmp_path):
    merges, path, _ = clip_bpe
    encoder, ref_encode = ref_clip_encoder(merges)
    (tmp_path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    tok = Tokenizer.from_clip_bpe(tmp_path)
    assert tok.encode_batch(PROBE_TEXTS) == [ref_encode(t) for t in PROBE_TEXTS]


def _real_clip_bpe() -> str | None:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz: CLIP_BPE_PATH, else the copy open_clip (the
    `interop` test extra) ships inside its package; None when neither is there."""
    if "CLIP_BPE_PATH" in os.environ:
        return os.environ["CLIP_BPE_PATH"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    return str(bundled) if bundled.is_file() else None


@pytest.mark.skipif(
    _real_clip_bpe() is None,
    reason="set CLIP_BPE_PATH to OpenAI's bpe_simple_vocab_16e6.txt.gz (or install open_clip)",
)
def test_real_clip_bpe_known_ids():
    tok = Tokenizer.from_clip_bpe(_real_clip_bpe())
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
