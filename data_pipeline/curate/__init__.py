"""Curation: the stage between img2dataset's shards and training (`python -m data_pipeline.curate`).

What decides a CLIP's quality at scale is as much the data as the trainer: LAION kept pairs with
CLIP image-text cosine > 0.28 (Schuhmann et al. 2022), DataComp's CLIP-score top 30% beat a 10x
larger raw pool (Gadre et al. 2023), MetaCLIP balanced its pool over metadata entries (Xu et al.
2023), DFN filtered with a network trained on trusted data (Fang et al. 2023). Each of those is a
step here, in its own module, switched on or off in `CurateConfig`:

    scan              per shard: key, caption, sha256, perceptual hash     (scan.py, sidecars)
    embed             per shard: image and text embeddings of a CLIP       (embeddings.py, sidecars)
    captions          word counts, boilerplate, ftfy, language id          (caption_filters.py)
    decontaminate     near copies of eval images                           (decontaminate.py)
    alignment         CLIP score threshold or top fraction                 (alignment.py)
    exact duplicates  same image bytes                                     (exact_duplicates.py)
    near duplicates   perceptual hash, 16x16 pixels, embedding cosine      (hash_duplicates.py,
                                                                           embedding_duplicates.py)
    balance           at most t pairs per metadata entry                   (balance.py)

The per-shard passes write sidecar files into the output folder (atomically, one per shard), so
an interrupted run resumes where it stopped and later runs reuse them; they split across
torchrun ranks. The decisions (`decisions.py`) then go out as a keep-list, DataComp's uid .npy,
new shards and a report. The input shards are only ever read.
"""
