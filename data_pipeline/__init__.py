"""URL list -> img2dataset -> webdataset shards, plus an offline demo corpus and a validator.

Entry points (thin: parse, build, run):
    shards.py             python -m data_pipeline.shards    (make shards / make demo)
    validate.py           python -m data_pipeline.validate  (make validate)

One URL list into one shard folder:
    shard_config.py       ShardConfig, the typed options of a run
    url_list.py           checks a URL list's file, columns and rows before img2dataset sees it
    shard_files.py        what a shard folder may hold
    img2dataset_runner.py the img2dataset call (log redirection, Ctrl-C handling)
    spark_session.py      the SparkSession around a `--distributor pyspark` run (master, sizes)
    manifest.py           sizes.json, manifest.json, failure reasons, the summary table
    shard_build.py        check -> download -> describe, for one folder

The demo corpus:
    demo_corpus.py        attribute vocabulary, HELD_OUT pairs, the deterministic row plan
    captions.py           varied captions from a scene's attributes
    shape_rendering.py    PIL drawing of each planned row, in parallel
    loopback_server.py    HTTP server on 127.0.0.1 for the rendered files
    demo_build.py         render -> serve -> download the train/val/heldout splits

Reading shards back (every reader: validate, the trainer, eval, search, the tokenizer):
    shard_format.py       tar -> raw samples, and what makes a sample usable (and why not)
    object_store.py       remote (s3://, fsspec) shard reads that retry and resume mid-object

errors.py holds UserError and run_main, shared with the other packages' entry points.
"""
