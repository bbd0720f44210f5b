"""The bench corpus: the offline demo corpus rendered and stored at 256 px (JPEG), short
captions, CLIP's BPE beside it. Built once into data/bench/corpus (gitignored) and reused.

    .venv/bin/python -m bench.corpus      # ~1 min on 2 cores

CLIP's BPE (the file OpenCLIP ships) makes our text lengths exactly the ones OpenCLIP tokenises.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT = REPO / "data" / "bench" / "corpus"
SAMPLES = 4096
SAMPLES_PER_SHARD = 512


def clip_bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def ensure_corpus(root: Path = ROOT) -> Path:
    """Build the shards and tokenizer.json unless a finished corpus is already there."""
    if not (root / "train" / "sizes.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "data_pipeline.shards", "--output", str(root),
             "--num-samples", str(SAMPLES), "--image-size", "256", "--render-size", "256",
             "--samples-per-shard", str(SAMPLES_PER_SHARD), "--incremental"],
            cwd=REPO, check=True,
        )
    tokenizer = root / "tokenizer.json"
    if not tokenizer.is_file():
        from training.text.tokenizer import Tokenizer

        Tokenizer.from_clip_bpe(clip_bpe_path()).save(tokenizer)
    return root


def caption_lengths(pattern: str, tokenizer_path: Path) -> list[int]:
    """CLIP-BPE token counts (SOT and EOT included) of every caption in the shards: the real
    text lengths the MFU counts."""
    from braceexpand import braceexpand

    from data_pipeline.shard_format import BadSample, decode_caption, read_shard
    from training.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    lengths = []
    for path in braceexpand(pattern):
        for raw in read_shard(path):
            try:
                lengths.append(len(tokenizer.encode(decode_caption(raw))))
            except BadSample:
                continue
    return lengths


if __name__ == "__main__":
    print(ensure_corpus())
