"""Training straight from a keep-list (`data.keep_list`), and the balancing step's draws.

The trainer must see exactly the kept pairs of the original shards, once per epoch, with the
epoch size taken from the keep-list, and resume mid-epoch as without one.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest

from data_pipeline.curate.balance import balance, match_entries
from training.data import DataError, build_train_loader
from test_data import PAD_ID, captions, config, take, tokenize, write_source


def _keep_list(folder, tmp_path, keep_every: int):
    rows = []
    for tar in sorted(folder.glob("*.tar")):
        for i in range(10):
            key = f"k{int(tar.stem):03d}{i:03d}"
            rows.append({"shard": str(tar), "key": key, "kept": i % keep_every == 0})
    path = tmp_path / "keep_list.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path, {r["key"] for r in rows if r["kept"]}


def test_trainer_reads_only_the_kept_pairs_and_resumes_exactly(tmp_path):
    folder = write_source(tmp_path / "pool", shards=4, per_shard=10, prefix="k")
    path, kept = _keep_list(folder, tmp_path, keep_every=3)  # 4 of 10 per shard: 16 pairs
    cfg = config(folder, keep_list=str(path), num_samples=None, sample_shuffle_buffer=5)
    loader = build_train_loader(cfg, tokenize, PAD_ID)
    assert loader.num_samples == len(kept) == 16  # from the keep-list, not sizes.json (40)
    batches = take(loader, 8)  # two epochs of 4 batches of 4
    epoch_keys = [Counter(k.rsplit("#", 1)[1] for b in batches[e * 4:(e + 1) * 4] for k in b["keys"])
                  for e in range(2)]
    assert epoch_keys[0] == epoch_keys[1] == Counter({k: 1 for k in kept})
    # Resumed after 3 batches == uninterrupted, batch for batch.
    state = build_train_loader(cfg, tokenize, PAD_ID)
    take(state, 3)
    resumed = build_train_loader(cfg, tokenize, PAD_ID, states=[state.state_dict()])
    assert [captions(b) for b in take(resumed, 5)] == [captions(b) for b in batches[3:8]]


def test_keep_list_for_other_shards_is_one_clear_error(tmp_path):
    folder = write_source(tmp_path / "pool", shards=2, per_shard=10, prefix="k")
    other = write_source(tmp_path / "other", shards=1, per_shard=10, prefix="k")
    path, _ = _keep_list(other, tmp_path, keep_every=2)
    with pytest.raises(DataError, match="is not in keep_list"):
        build_train_loader(config(folder, keep_list=str(path)), tokenize, PAD_ID)
    with pytest.raises(ValueError, match="no such file"):
        config(folder, keep_list=str(tmp_path / "missing.parquet"))


def test_balancing_caps_head_entries_and_keeps_the_tail():
    # 400 pairs mention "photo" (a head entry at t=50); 20 also mention "zebra" (tail).
    captions_ = [f"a photo of item {i}" for i in range(380)] + [f"a photo of a zebra {i}" for i in range(20)]
    captions_ += ["nothing matches here"] * 5
    keys = [str(i) for i in range(len(captions_))]
    removed, counts = balance(captions_, ["s"] * len(keys), keys, ["photo", "zebra"], per_entry=50,
                              keep_unmatched=False, seed=0)
    assert counts == {"photo": 400, "zebra": 20}
    assert not removed[380:400].any()  # every tail pair survives its entry's draw
    assert removed[400:].all()  # no entry: dropped, as in MetaCLIP
    kept_photo_only = int((~removed[:380]).sum())
    assert 25 <= kept_photo_only <= 75  # ~ 380 * 50 / 400 = 47.5
    again, _ = balance(list(reversed(captions_)), ["s"] * len(keys), list(reversed(keys)),
                       ["photo", "zebra"], 50, False, 0)
    assert list(reversed(again)) == list(removed)  # per-pair draws: order does not matter
    assert match_entries(["Category: Cats"], ["cat", "dog"]) == [["cat"]]  # substring, any case
