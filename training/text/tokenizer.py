"""Caption tokenizer: a thin wrapper over a `tokenizers` BPE model, plus how to build one.

Every tokenizer this project uses is a `tokenizers` JSON file, so the Rust BPE does the work and
a checkpoint can carry its tokenizer as one file. Three ways to get one:

* `train_tokenizer(captions, vocab_size, out_path)`: byte-level BPE trained on our own captions
  (the CLI below runs it over webdataset shards).
* `Tokenizer.from_clip_bpe(path)`: the BPE OpenAI released with CLIP
  (`bpe_simple_vocab_16e6.txt.gz`, also the HF `vocab.json` + `merges.txt` layout), rebuilt
  with the same ids, so checkpoints trained with it stay interchangeable with OpenAI/OpenCLIP
  text towers.
* `Tokenizer.from_file(path)`: any JSON written by the two above (`Tokenizer.save`).

Sequences are `[SOT, ..., EOT]` and are NOT padded to the context length: a batch is padded to
its longest caption (the text tower is causal and pools at EOT, so padding never changes the
result, only costs compute).

CLI: python -m training.text.tokenizer --shards data/shards --vocab-size 4096
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from data_pipeline.shard_format import BadSample, decode_caption, read_shard

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

# CLIP's pre-tokenizer pattern (CLIP paper, Radford et al. 2021, released simple_tokenizer):
# contractions, runs of letters, single digits, runs of other non-space symbols. Whitespace is
# dropped, word ends are marked by the '</w>' suffix instead of a leading-space symbol.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_WORD_END = "</w>"
# OpenAI's merges file holds more merges than CLIP used: its vocab is 49408 = 512 byte symbols
# + 48894 merges + 2 special tokens, so only the first 48894 merges count.
CLIP_NUM_MERGES = 49152 - 256 - 2


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, pad_to: int | None = None
) -> torch.Tensor:
    """Stack token id lists into a (batch, length) LongTensor, right-padded with `pad_id`.

    `length` is the longest sequence (dynamic text length) unless `pad_to` asks for more.
    Usable from a collate function that only knows `pad_id`.
    """
    longest = max((len(s) for s in sequences), default=0)
    if pad_to is not None and pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({longest})")
    length = longest if pad_to is None else pad_to
    batch = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        batch[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    return batch


class Tokenizer:
    """Text -> `[SOT, ..., EOT]` id lists, truncated to `context_length` with EOT kept last."""

    pad_batch = staticmethod(pad_batch)

    def __init__(self, backend: tokenizers.Tokenizer, context_length: int = 77) -> None:
        if context_length < 2:
            raise ValueError(
                f"context_length must leave room for SOT and EOT, got {context_length}"
            )
        self.context_length = context_length
        self.sot_id = _require_token(backend, SOT_TOKEN)
        self.eot_id = _require_token(backend, EOT_TOKEN)
        # The pad id lives in the JSON's padding section: CLIP pads with id 0 (a real token,
        # harmless because pooling stops at EOT and attention is causal), ours with <|pad|>.
        if backend.padding is not None:
            self.pad_id = int(backend.padding["pad_id"])
        else:
            self.pad_id = _require_token(backend, PAD_TOKEN)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # We pad and truncate ourselves (EOT must survive truncation), so the backend must not.
        backend.no_padding()
        backend.no_truncation()
        # A caption containing the literal text "<|endoftext|>" must not produce an EOT id: the
        # text tower pools at the first EOT.
        backend.encode_special_tokens = True
        self._backend = backend

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 77) -> Tokenizer:
        """Load a tokenizers JSON written by `train_tokenizer` or `Tokenizer.save`."""
        return cls(tokenizers.Tokenizer.from_file(str(path)), context_length)

    @classmethod
    def from_clip_bpe(cls, path: str | Path, context_length: int = 77) -> Tokenizer:
        """Rebuild OpenAI CLIP's tokenizer from its released BPE merges.

        `path` is either the merges list (`bpe_simple_vocab_16e6.txt.gz`, or uncompressed) from
        which the vocab is derived as CLIP does, or a directory holding HF's `vocab.json` and
        `merges.txt`. With the real file: vocab 49408, SOT 49406, EOT 49407, pad 0 (as OpenCLIP).
        Differences from OpenAI's Python tokenizer: no ftfy/HTML unescaping (captions should be
        clean by the time they reach us); everything else (lowercasing, whitespace collapsing,
        the split pattern, byte symbols, merge order) is the same.
        """
        path = Path(path)
        if path.is_dir():
            vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
            merges = _read_merges(path / "merges.txt", limit=None)
        else:
            merges = _read_merges(path, limit=CLIP_NUM_MERGES)
            vocab = _clip_vocab(merges)
        backend = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=CLIP_WORD_END, unk_token=None)
        )
        backend.normalizer = _clip_normalizer()
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # invert=True: the pattern describes the pieces to keep; what lies between
                # them (whitespace) is removed.
                pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        # Byte symbols back to text first, then each word-end marker becomes a space.
        backend.decoder = decoders.Sequence(
            [decoders.ByteLevel(), decoders.Replace(CLIP_WORD_END, " ")]
        )
        backend.add_special_tokens(
            [AddedToken(SOT_TOKEN, special=True), AddedToken(EOT_TOKEN, special=True)]
        )
        backend.enable_padding(pad_id=0, pad_token=backend.id_to_token(0))
        return cls(backend, context_length)

    def save(self, path: str | Path) -> None:
        """Write the JSON `from_file` reads (pad id recorded in its padding section)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def to_json(self) -> str:
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        backend.enable_padding(pad_id=self.pad_id, pad_token=backend.id_to_token(self.pad_id))
        return backend.to_str()

    @classmethod
    def from_json(cls, text: str, context_length: int = 77) -> Tokenizer:
        return cls(tokenizers.Tokenizer.from_str(text), context_length)

    def __reduce__(self):
        # DataLoader workers receive the tokenizer pickled. The backend's own pickling drops
        # the encode_special_tokens switch, so rebuild through __init__ from our JSON instead.
        return (Tokenizer.from_json, (self.to_json(), self.context_length))

    # -- use ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids) for e in encodings]

    def __call__(self, texts: str | Sequence[str], pad_to: int | None = None) -> torch.Tensor:
        """Tokenize a batch into a (batch, length) LongTensor; see `pad_batch` for `length`."""
        if isinstance(texts, str):
            texts = [texts]
        return pad_batch(self.encode_batch(texts), self.pad_id, pad_to)

    def pad(self, sequences: Sequence[Sequence[int]], pad_to: int | None = None) -> torch.Tensor:
        return pad_batch(sequences, self.pad_id, pad_to)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one sequence: SOT dropped, everything from the first EOT on (padding) cut."""
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        return self._backend.decode(ids, skip_special_tokens=True).strip()

    def _wrap(self, ids: list[int]) -> list[int]:
        return [self.sot_id, *ids[: self.context_length - 2], self.eot_id]

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"sot={self.sot_id}, eot={self.eot_id}, pad={self.pad_id})"
        )


def train_tokenizer(
    captions: Iterable[str], vocab_size: int, out_path: str | Path, context_length: int = 77
) -> Tokenizer:
    """Train a byte-level BPE on `captions`, save it as JSON at `out_path`, and return it.

    Byte-level means every string is encodable (no unknown token) and `vocab_size` counts the
    256 byte symbols and the 3 special tokens (<|pad|> = 0, <|startoftext|> = 1, <|endoftext|> = 2).
    """
    minimum = 256 + 3
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (bytes + specials), got {vocab_size}"
        )
    backend = tokenizers.Tokenizer(models.BPE(unk_token=None))
    backend.normalizer = _clip_normalizer()
    # add_prefix_space: "cat" at the start of a caption gets the same id as " cat" inside one.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, SOT_TOKEN, EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(captions, trainer)
    tokenizer = Tokenizer(backend, context_length)
    tokenizer.save(out_path)
    return tokenizer


# -- helpers ------------------------------------------------------------------------------------


def _clip_normalizer() -> normalizers.Normalizer:
    # CLIP cleans captions as: collapse whitespace runs to one space, strip, lowercase.
    return normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Lowercase(),
        ]
    )


def _require_token(backend: tokenizers.Tokenizer, token: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return token_id


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable symbol table, in the order CLIP numbers its base vocab.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (control chars, space, ...)
    get the code points 256, 257, ... so every symbol is a visible character. `tokenizers`'
    ByteLevel pre-tokenizer uses the same table, which is what makes the two interchangeable.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    # CLIP's id order: byte symbols, the same with '</w>', one token per merge, then SOT, EOT.
    base = list(bytes_to_unicode().values())
    tokens = [
        *base,
        *(b + CLIP_WORD_END for b in base),
        *("".join(m) for m in merges),
        SOT_TOKEN,
        EOT_TOKEN,
    ]
    return {token: i for i, token in enumerate(tokens)}


def _read_merges(path: Path, limit: int | None) -> list[tuple[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: merge lines must hold two symbols, got {bad[0]!r}")
    return merges[:limit] if limit is not None else merges


def iter_shard_captions(shards_dir: str | Path) -> Iterator[str]:
    """Captions of every webdataset `*.tar` shard in `shards_dir`, in order: the captions the
    trainer would use (samples it would skip for their caption are left out here too)."""
    shards = sorted(Path(shards_dir).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no *.tar shards in {shards_dir}")
    for shard in shards:
        for raw in read_shard(str(shard)):
            try:
                yield decode_caption(raw)
            except BadSample:
                continue


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train a byte-level BPE caption tokenizer on shards."
    )
    parser.add_argument("--shards", required=True, help="directory of webdataset *.tar shards")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", default=None, help="output JSON (default: SHARDS/tokenizer.json)")
    parser.add_argument("--context-length", type=int, default=77)
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.shards) / "tokenizer.json"

    # Keep a bounded sample for the length statistic; training streams over everything.
    sample: list[str] = []

    def captions() -> Iterator[str]:
        for caption in iter_shard_captions(args.shards):
            if len(sample) < 10_000:
                sample.append(caption)
            yield caption

    tokenizer = train_tokenizer(captions(), args.vocab_size, out, args.context_length)
    lengths = [len(ids) for ids in tokenizer.encode_batch(sample)]
    median = statistics.median(lengths) if lengths else 0
    print(f"saved {out}")
    # Fewer than asked when the corpus runs out of pairs worth merging.
    print(f"vocab size: {tokenizer.vocab_size} (asked for {args.vocab_size})")
    print(f"median tokens/caption (with SOT/EOT, {len(sample)} captions): {median}")


if __name__ == "__main__":
    main()
