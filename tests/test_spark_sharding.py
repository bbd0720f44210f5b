"""`python -m data_pipeline.shards --distributor pyspark` on a real standalone Spark cluster
(tests/spark_cluster.py: a master and one 2-core worker on 127.0.0.1), checked against the
multiprocessing run of the same URL list: same keys, captions, image bytes and metadata per
sample, same sizes.json, same manifest apart from the run's timing and the distributor.

Skipped, with the reason, when Java 17+ or pyspark is missing or the cluster does not start;
`.ci/run` installs the Java runtime, the dev extra brings pyspark.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline.loopback_server import serve_folder
from data_pipeline.spark_session import APP_NAME
from spark_cluster import LocalSpark, free_port, missing_reason, spark_home

REPO_ROOT = Path(__file__).resolve().parents[1]
MISSING = missing_reason()
needs_spark = pytest.mark.skipif(MISSING is not None, reason=f"needs a local Spark: {MISSING}")
GOOD, DEAD, GARBAGE = 480, 10, 10
URLS = GOOD + DEAD + GARBAGE  # 500 rows -> 10 shards of 50
SAMPLES_PER_SHARD = 50
IMAGE_SIZE = 32
RUN_TIMEOUT_S = 300


def _jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    colour = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
    Image.new("RGB", (24 + (i % 4) * 8, 24 + (i % 3) * 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def url_source(tmp_path_factory: pytest.TempPathFactory):
    """500 served URLs (10 dead, 10 not images) and their CSV list, for the module's lifetime."""
    root = tmp_path_factory.mktemp("spark_source")
    images = root / "images"
    images.mkdir()
    rows = []
    for i in range(URLS):
        name = f"img_{i:04d}.jpg"
        if i % 50 == 7:
            pass  # dead: never written, the server answers 404
        elif i % 50 == 33:
            (images / name).write_bytes(b"<html>not an image</html>" * 10)
        else:
            (images / name).write_bytes(_jpeg(i))
        rows.append((name, f"swatch {i} in colour {(i * 37) % 256}"))
    with serve_folder(images) as base_url:
        list_path = root / "pairs.csv"
        with open(list_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "caption"])
            writer.writerows((f"{base_url}/{name}", caption) for name, caption in rows)
        yield {"list": list_path, "root": root}


def _shard(url_list: Path, output: Path, *extra: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "data_pipeline.shards", "--url-list", str(url_list),
         "--output", str(output), "--image-size", str(IMAGE_SIZE),
         "--samples-per-shard", str(SAMPLES_PER_SHARD), "--processes", "2", "--threads", "8",
         "--timeout", "5", *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env,
    )


@pytest.fixture(scope="module")
def multiprocessing_shards(url_source) -> Path:
    output = url_source["root"] / "multiprocessing"
    result = _shard(url_source["list"], output)
    assert result.returncode == 0, result.stdout + result.stderr
    return output


@pytest.fixture(scope="module")
def spark_cluster(multiprocessing_shards, tmp_path_factory):
    """A local master + one 2-core, 1 GB worker, started after the multiprocessing run (one of
    them at a time on the shared cores) and always stopped."""
    cluster = LocalSpark(tmp_path_factory.mktemp("spark_cluster"), cores=2, worker_memory="1g")
    try:
        cluster.start(timeout=90)
    except RuntimeError as exc:
        cluster.stop()
        pytest.skip(f"a local Spark cluster did not start: {str(exc).splitlines()[0]}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def spark_run(url_source, spark_cluster) -> dict:
    """The same list as the multiprocessing run, through the local cluster."""
    output = url_source["root"] / "pyspark"
    result = _shard(url_source["list"], output, "--distributor", "pyspark",
                    "--spark-master", spark_cluster.master_url, "--spark-executor-memory", "512m",
                    "--spark-cores-max", "2", env=spark_cluster.env)
    assert result.returncode == 0, result.stdout + result.stderr + spark_cluster.logs()
    assert "Traceback" not in result.stdout + result.stderr
    return {
        "output": output,
        "state": spark_cluster.state(),
        "app_dirs": sorted(p for p in (spark_cluster.root / "work").glob("app-*") if p.is_dir()),
        "stdout": result.stdout,
        "stderr": result.stderr,
    }


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every tar in `folder`: key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _tar_keys(folder: Path) -> dict[str, list[str]]:
    """tar name -> its sample keys in order: the same shard must hold the same samples."""
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            out[tar_path.name] = sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})
    return out


@needs_spark
@pytest.mark.slow
def test_spark_shards_hold_the_same_samples_as_multiprocessing(multiprocessing_shards, spark_run):
    spark = spark_run["output"]
    assert _tar_keys(spark) == _tar_keys(multiprocessing_shards)
    expected, got = _samples(multiprocessing_shards), _samples(spark)
    assert len(expected) == GOOD
    assert sorted(got) == sorted(expected)
    for key, parts in expected.items():
        assert set(got[key]) == set(parts) == {"jpg", "txt", "json"}, key
        assert got[key]["txt"] == parts["txt"], key
        assert got[key]["jpg"] == parts["jpg"], key  # same resize and encoding, byte for byte
        assert json.loads(got[key]["json"]) == json.loads(parts["json"]), key


@needs_spark
@pytest.mark.slow
def test_spark_sizes_and_manifest_agree_with_multiprocessing(multiprocessing_shards, spark_run):
    spark = spark_run["output"]
    sizes = json.loads((spark / "sizes.json").read_text())
    assert sizes == json.loads((multiprocessing_shards / "sizes.json").read_text())
    assert sum(sizes.values()) == GOOD and len(sizes) == URLS // SAMPLES_PER_SHARD
    ours = json.loads((spark / "manifest.json").read_text())
    theirs = json.loads((multiprocessing_shards / "manifest.json").read_text())
    # What only describes how the run went, not what it produced.
    for manifest in (ours, theirs):
        manifest.pop("run")
        manifest.pop("written_at")
    assert ours["options"].pop("distributor") == "pyspark"
    assert theirs["options"].pop("distributor") == "multiprocessing"
    assert ours["options"].pop("output") == str(spark)
    assert theirs["options"].pop("output") == str(multiprocessing_shards)
    assert ours == theirs
    assert ours["complete"] and ours["totals"]["success"] == GOOD
    assert ours["failure_reasons"] == {"http 404": DEAD, "undecodable image": GARBAGE}


@needs_spark
@pytest.mark.slow
def test_spark_shards_were_downloaded_by_the_clusters_executors(spark_run):
    """Not a silent local[N] fallback: the master ran our application on its worker."""
    apps = spark_run["state"]["completedapps"] + spark_run["state"]["activeapps"]
    ours = [app for app in apps if app["name"] == APP_NAME]
    assert len(ours) == 1, apps
    assert ours[0]["cores"] == 2 and ours[0]["memoryperexecutor"] == 512
    assert len(spark_run["app_dirs"]) == 1
    executor_logs = list(spark_run["app_dirs"][0].glob("*/stderr"))
    assert executor_logs, "the worker started no executor"
    assert re.search(rf"shards +10/10 finished, {GOOD} samples", spark_run["stdout"]), spark_run["stdout"]
    assert f"spark: {spark_run['state']['url']}, application app-" in spark_run["stdout"]
    assert spark_run["stderr"] == ""  # the JVM's start-up notes go to the driver log


@needs_spark
@pytest.mark.slow
def test_executors_the_cluster_cannot_grant_end_in_one_line_not_a_hang(url_source, spark_cluster,
                                                                      spark_run, tmp_path):
    """The worker has 1 GB: a 4 GB executor never starts, and Spark alone would wait forever."""
    output = tmp_path / "shards"
    result = _shard(url_source["list"], output, "--distributor", "pyspark",
                    "--spark-master", spark_cluster.master_url, "--spark-executor-memory", "4g",
                    "--spark-start-timeout", "5", env=spark_cluster.env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: the Spark master {spark_cluster.master_url} started no executor within 5 s "
        "(spark.executor.memory=4g): does a worker have that much free memory and cores? "
        "(see its web UI; --spark-start-timeout waits longer)"
    ]
    assert not output.exists()
    # The refused application was stopped, not left queued on the master.
    apps = spark_cluster.state()
    assert not [a for a in apps["activeapps"] if a["name"] == APP_NAME], apps["activeapps"]


@pytest.mark.skipif(spark_home() is None, reason="pyspark is not installed")
def test_unreachable_spark_master_is_one_error_line(url_source, tmp_path):
    output = tmp_path / "shards"
    master = f"spark://127.0.0.1:{free_port()}"  # nothing listens there
    result = _shard(url_source["list"], output, "--distributor", "pyspark", "--spark-master", master)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: cannot reach the Spark master {master} (is it running, and the port open?)"]
    assert not output.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--spark-master", "spark://127.0.0.1:7077"], "the --spark-* options need --distributor pyspark"),
        (["--distributor", "pyspark", "--spark-executor-memory", "lots"],
         "--spark-executor-memory is a JVM size such as 2g or 512m, got 'lots'"),
        (["--distributor", "pyspark", "--spark-cores-max", "0"], "--spark-cores-max must be positive, got 0"),
    ],
)
def test_bad_spark_options_are_one_error_line(url_source, tmp_path, extra, message):
    result = _shard(url_source["list"], tmp_path / "shards", *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "shards").exists()
