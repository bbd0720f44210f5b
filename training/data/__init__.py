"""Where a batch comes from: webdataset shards -> decoded, augmented, tokenized batches.

    config.py      DataConfig (`[data]`) and the AugmentConfig the transforms take
    sources.py     shard listing, sizes.json, per-epoch shard schedule and shuffle, source mixing
    handover.py    resume on another world size: the rest of the epoch, shared out anew
    decode.py      raw sample -> (pixels, tokens), batching with dynamic padding, shard judging
    transforms.py  train/eval image transforms, normalisation on the trainer's device
    loader.py      the per-worker stream and the rank's TrainLoader with exact resume

Reading the tars themselves is `data_pipeline.shard_format`, shared with validate and eval.
"""

from training.data.config import AugmentConfig, DataConfig, DataError
from training.data.loader import TrainLoader, build_train_loader, smallest_decode_size

__all__ = [
    "AugmentConfig", "DataConfig", "DataError", "TrainLoader", "build_train_loader",
    "smallest_decode_size",
]
