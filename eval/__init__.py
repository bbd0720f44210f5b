"""Evaluation of trained CLIP checkpoints.

The file list is the architecture:

    run.py          CLI: evaluate one checkpoint, watch a run directory, or score an
                    OpenAI/OpenCLIP file (--pretrained, via training.interop) (thin entry point)
    search.py       CLI: text -> image search over shards
    image_index.py  the search index: shard images embedded once, cached on disk
    suites.py       the registry: suite name -> evaluator (demo, cifar10, imagenet, retrieval, ...)
    evaluate.py     one checkpoint through the chosen suites: results, records, plot, W&B
    watch.py        evaluate each new checkpoint of a run exactly once until the run ends
    config.py       typed configs: inference, dataset paths, linear probe
    datasets.py     classification datasets in the formats people have (CIFAR pickles,
                    ImageFolder, ImageNet synset folders, webdataset shards with .cls)
    shard_images.py one pass over webdataset shards as an image dataset (with any payload)
    features.py     batched, no-grad image/text encoding and prompt-ensembled class embeddings
    metrics.py      top-k accuracy, mean per-class recall, retrieval recall@k, chance levels
    zeroshot.py     zero-shot classification
    datacomp.py     the DataComp 38-task suite: per-task metrics, group metrics, aggregates
    datacomp_tasks.py  DataComp's task list, main metrics, aggregates, OpenAI B/32 reference
    wds_tasks.py    eval sets in CLIP_benchmark's webdataset layout (one folder per task)
    compositionality.py  SugarCrepe and Winoground
    sharding.py     eval under torchrun: a slice per rank, features gathered, rank 0 records
    retrieval.py    image<->text retrieval (several captions per image)
    linear_probe.py logistic regression on frozen image features, C chosen on a validation split
    demo.py         the demo corpus suite (compositional held-out colour x shape) and the
                    in-training hook `DemoZeroShot` (the trainer's entry point passes it in)
    results.py      result JSON files, done records, summary tables
    plots.py        metric-vs-step plot and search result grids (matplotlib, Agg)
    wandb_log.py    results into the training run's W&B run
    templates/      class names and prompt templates (data files, with their sources)
"""
