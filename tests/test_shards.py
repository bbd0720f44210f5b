"""`python -m data_pipeline.shards --url-list ...`: a real img2dataset run against a loopback
server (some URLs dead, some files not images), then every refusal and rerun path."""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.loopback_server import serve_folder
from data_pipeline.manifest import failure_reason
from data_pipeline.shard_config import ShardConfig, infer_input_format
from data_pipeline.url_list import inspect_url_list

GOOD, DEAD, GARBAGE, TRUNCATED = 184, 8, 4, 4
URLS = GOOD + DEAD + GARBAGE + TRUNCATED  # 200 rows -> 4 shards of 50
SAMPLES_PER_SHARD = 50
IMAGE_SIZE = 48
LICENSES = ("cc0", "cc-by")


def _jpeg(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_source(folder: Path) -> list[dict[str, str]]:
    """Images of several sizes and aspect ratios plus planted failures; returns the list rows
    with columns named the way LAION-style lists name them (URL, TEXT)."""
    folder.mkdir()
    rows = []
    for i in range(URLS):
        name = f"img_{i:04d}.jpg"
        kind = (
            "good"
            if i % 25 >= 2
            else ("dead" if i % 50 in (0, 1) else ("garbage" if i % 50 == 25 else "truncated"))
        )
        colour = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
        if kind == "good":
            (folder / name).write_bytes(_jpeg(40 + (i % 5) * 20, 40 + (i % 3) * 30, colour))
        elif kind == "garbage":
            (folder / name).write_bytes(b"this is an error page, not a jpeg " * 20)
        elif kind == "truncated":
            data = _jpeg(120, 90, colour)
            (folder / name).write_bytes(data[: len(data) // 2])
        rows.append(
            {
                "URL": name,
                "TEXT": f"a flat colour swatch number {i}",
                "license": LICENSES[i % 2],
                "kind": kind,
            }
        )
    return rows


@pytest.fixture(scope="module")
def url_source(tmp_path_factory: pytest.TempPathFactory):
    """A served folder and its CSV URL list; the server lives as long as this test module."""
    base = tmp_path_factory.mktemp("url_source")
    rows = _write_source(base / "images")
    with serve_folder(base / "images") as url:
        list_path = base / "pairs.csv"
        with open(list_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["URL", "TEXT", "license"])
            writer.writeheader()
            for row in rows:
                writer.writerow(
                    {"URL": f"{url}/{row['URL']}", "TEXT": row["TEXT"], "license": row["license"]}
                )
        yield {"list": list_path, "rows": rows, "base_url": url, "root": base}


def _shard_args(url_list: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--url-list",
        str(url_list),
        "--output",
        str(output),
        "--url-col",
        "URL",
        "--caption-col",
        "TEXT",
        "--extra-columns",
        "license",
        "--image-size",
        str(IMAGE_SIZE),
        "--samples-per-shard",
        str(SAMPLES_PER_SHARD),
        "--processes",
        "2",
        "--threads",
        "8",
        "--timeout",
        "5",
        *extra,
    ]


@pytest.fixture(scope="module")
def url_shards(url_source, run_cli) -> Path:
    output = url_source["root"] / "shards"
    result = run_cli("data_pipeline.shards", *_shard_args(url_source["list"], output))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return output


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_shards_hold_image_caption_and_metadata_per_sample(url_shards, url_source):
    by_url = {f"{url_source['base_url']}/{r['URL']}": r for r in url_source["rows"]}
    tars = sorted(url_shards.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    seen = 0
    for tar in tars:
        assert (url_shards / tar.name.replace(".tar", ".parquet")).exists()
        assert (url_shards / tar.name.replace(".tar", "_stats.json")).exists()
        for key, parts in _tar_samples(tar).items():
            assert set(parts) == {"jpg", "txt", "json"}, key
            meta = json.loads(parts["json"])
            source = by_url[meta["url"]]
            assert source["kind"] == "good"
            assert parts["txt"].decode() == source["TEXT"]
            assert meta["license"] == source["license"]  # kept via --extra-columns
            assert meta["key"] == key and meta["status"] == "success"
            with Image.open(io.BytesIO(parts["jpg"])) as image:
                assert image.size == (IMAGE_SIZE, IMAGE_SIZE)  # resize_mode border pads to a square
            seen += 1
    assert seen == GOOD


def test_sizes_json_counts_the_samples_in_each_tar(url_shards):
    sizes = json.loads((url_shards / "sizes.json").read_text())
    assert sizes == {tar.name: len(_tar_samples(tar)) for tar in sorted(url_shards.glob("*.tar"))}
    assert sum(sizes.values()) == GOOD


def test_manifest_counts_successes_and_failure_reasons(url_shards, url_source):
    manifest = json.loads((url_shards / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["shards"] == {"finished": 4, "expected": 4, "unfinished": [], "samples": GOOD}
    assert manifest["totals"]["urls"] == URLS
    assert manifest["totals"]["success"] == GOOD
    assert manifest["totals"]["success_rate"] == pytest.approx(GOOD / URLS, abs=1e-4)
    assert manifest["failure_reasons"] == {"http 404": DEAD, "undecodable image": GARBAGE + TRUNCATED}
    words = [len(r["TEXT"].split()) for r in url_source["rows"] if r["kind"] == "good"]
    assert manifest["caption_words"]["min"] == min(words) and manifest["caption_words"]["max"] == max(words)
    assert manifest["image_width"] == {
        "min": IMAGE_SIZE,
        "median": IMAGE_SIZE,
        "mean": IMAGE_SIZE,
        "max": IMAGE_SIZE,
    }
    assert manifest["options"]["extra_columns"] == ["license"]
    assert manifest["run"]["images"] == GOOD and manifest["run"]["images_per_s"] > 0
    # The parquet img2dataset wrote agrees: one row per URL, failures included.
    statuses = [
        s for p in sorted(url_shards.glob("*.parquet")) for s in pq.read_table(p)["status"].to_pylist()
    ]
    assert len(statuses) == URLS and statuses.count("success") == GOOD


def test_failure_messages_are_normalised():
    assert failure_reason("HTTP Error 404: File not found") == "http 404"
    assert failure_reason("HTTP Error 503: Service Unavailable") == "http 503"
    assert failure_reason("<urlopen error timed out>") == "timeout"
    assert failure_reason("<urlopen error [Errno 111] Connection refused>") == "connection refused"
    assert failure_reason("<urlopen error [Errno -2] Name or service not known>") == "dns lookup failed"
    assert failure_reason("Image decoding error") == "undecodable image"
    assert failure_reason("something new") == "other"


def test_incremental_rerun_downloads_only_the_missing_shard(url_shards, url_source, run_cli, tmp_path):
    output = tmp_path / "shards"
    shutil.copytree(url_shards, output)
    sizes_before = json.loads((output / "sizes.json").read_text())
    for name in ("00002.tar", "00002.parquet", "00002_stats.json"):
        (output / name).unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in output.glob("*.tar")}

    result = run_cli("data_pipeline.shards", *_shard_args(url_source["list"], output, "--incremental"))

    assert result.returncode == 0, result.stdout + result.stderr
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["run"]["shards_downloaded"] == 1 and manifest["run"]["shards_skipped"] == 3
    assert {p: output.joinpath(p).stat().st_mtime_ns for p in untouched} == untouched
    assert json.loads((output / "sizes.json").read_text()) == sizes_before


def test_incremental_rerun_of_a_finished_folder_does_nothing(url_shards, url_source, run_cli):
    manifest_before = (url_shards / "manifest.json").read_text()
    result = run_cli("data_pipeline.shards", *_shard_args(url_source["list"], url_shards, "--incremental"))
    assert result.returncode == 0, result.stderr
    assert "nothing to download" in result.stdout
    assert (url_shards / "manifest.json").read_text() == manifest_before


def test_rerun_without_incremental_is_refused(url_shards, url_source, run_cli):
    listing = sorted(p.name for p in url_shards.iterdir())
    result = run_cli("data_pipeline.shards", *_shard_args(url_source["list"], url_shards))
    assert_one_error_line(result, "already holds shards", "--incremental")
    assert sorted(p.name for p in url_shards.iterdir()) == listing


def test_incremental_rerun_with_other_shard_size_is_refused(url_shards, url_source, run_cli):
    args = _shard_args(url_source["list"], url_shards, "--incremental")
    args[args.index("--samples-per-shard") + 1] = "60"
    assert_one_error_line(run_cli("data_pipeline.shards", *args), "samples_per_shard was 50, now 60")


@pytest.mark.parametrize("mode", ["url_list", "demo"])
@pytest.mark.parametrize("incremental", [False, True])
def test_foreign_files_are_refused_and_kept(url_source, run_cli, tmp_path, mode, incremental):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine, do not delete")
    (output / "photos").mkdir()
    (output / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    args = (
        _shard_args(url_source["list"], output)
        if mode == "url_list"
        else ["--output", str(output), "--num-samples", "10"]
    )
    result = run_cli("data_pipeline.shards", *args, *(["--incremental"] if incremental else []))
    assert_one_error_line(result, "not ours", "notes.txt", "photos")
    assert sorted(p.name for p in output.rglob("*")) == ["cat.jpg", "notes.txt", "photos"]
    assert (output / "notes.txt").read_text() == "mine, do not delete"


def test_missing_url_list_is_one_line(run_cli, tmp_path):
    result = run_cli(
        "data_pipeline.shards", "--url-list", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "o")
    )
    assert_one_error_line(result, "no URL list at", "nope.parquet")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("header", "flags", "missing"),
    [
        ("link,text", [], "url, caption"),
        ("link,text", ["--url-col", "link"], "caption"),
        ("url,caption", ["--extra-columns", "license"], "license"),
    ],
)
def test_missing_columns_are_named_with_the_ones_present(run_cli, tmp_path, header, flags, missing):
    url_list = tmp_path / "pairs.csv"
    url_list.write_text(f"{header}\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    result = run_cli(
        "data_pipeline.shards", "--url-list", str(url_list), "--output", str(tmp_path / "o"), *flags
    )
    line = assert_one_error_line(result, f"has no column {missing}")
    assert line.endswith(f"its columns are: {header.replace(',', ', ')}")


@pytest.mark.parametrize(
    ("name", "flags", "needle"),
    [
        ("pairs.txt", [], "no captions"),
        ("pairs.dat", [], "--input-format"),
        ("pairs.csv", ["--processes", "0"], "--processes must be positive"),
        ("pairs.csv", ["--extra-columns", "status"], "img2dataset writes those itself"),
    ],
)
def test_bad_options_are_one_line(run_cli, tmp_path, name, flags, needle):
    url_list = tmp_path / name
    url_list.write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    result = run_cli(
        "data_pipeline.shards", "--url-list", str(url_list), "--output", str(tmp_path / "o"), *flags
    )
    assert_one_error_line(result, needle)


@pytest.mark.slow
def test_run_where_nothing_downloads_fails_with_the_summary(url_source, run_cli, tmp_path):
    url_list = tmp_path / "dead.csv"
    dead = [r for r in url_source["rows"] if r["kind"] == "dead"]
    url_list.write_text(
        "url,caption\n" + "".join(f"{url_source['base_url']}/{r['URL']},{r['TEXT']}\n" for r in dead)
    )
    result = run_cli(
        "data_pipeline.shards",
        "--url-list",
        str(url_list),
        "--output",
        str(tmp_path / "o"),
        "--processes",
        "1",
        "--threads",
        "4",
    )
    assert_one_error_line(result, "nothing was downloaded", f"all {DEAD} URLs failed", f"http 404: {DEAD}")
    assert "http 404" in result.stdout  # the summary table is printed before the error
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["totals"]["success"] == 0 and manifest["failure_reasons"] == {"http 404": DEAD}


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    """A slow web server: every response waits, so a download is still running when Ctrl-C comes."""

    requests_seen = 0

    def do_GET(self) -> None:
        type(self).requests_seen += 1
        time.sleep(0.3)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_a_resumable_folder(url_source, tmp_path):
    output = tmp_path / "o"
    handler = functools.partial(_SlowHandler, directory=str(url_source["root"] / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    slow_list = tmp_path / "slow.csv"
    slow_list.write_text(
        url_source["list"].read_text().replace(url_source["base_url"], f"http://127.0.0.1:{server.server_port}")
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline.shards",
         *_shard_args(slow_list, output, "--threads", "2", "--processes", "1")],
        cwd=Path(__file__).resolve().parents[1],
        # An ignored SIGINT is inherited and Python then keeps ignoring it; code run in-process
        # by earlier tests may have left it ignored in this pytest process.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Interrupt once img2dataset's workers are downloading: the moment its own SIGINT
        # handler (exit status 0, or a hang) would have struck. The server's request count says
        # so for sure (its log file may be buffered until the end).
        _SlowHandler.requests_seen = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _SlowHandler.requests_seen < 4:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        server.shutdown()
        server.server_close()
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted")
    assert "_tmp" not in os.listdir(output)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["run"]["interrupted"] is True


def test_demo_and_url_list_folders_are_never_mixed(url_shards, demo_shards, url_source, run_cli):
    into_shards = run_cli(
        "data_pipeline.shards", "--output", str(url_shards), "--num-samples", "10", "--incremental"
    )
    assert_one_error_line(into_shards, "not ours", "00000.tar")
    into_demo = run_cli(
        "data_pipeline.shards", *_shard_args(url_source["list"], demo_shards, "--incremental")
    )
    assert_one_error_line(into_demo, "not ours", "corpus.json", "heldout")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet", "csv.gz"])
def test_url_lists_of_every_format_are_read_with_their_columns_and_rows(tmp_path, fmt):
    frame = pd.DataFrame({"URL": [f"http://127.0.0.1:9/{i}.jpg" for i in range(7)], "TEXT": ["a, b"] * 7})
    path = tmp_path / f"pairs.{fmt}"
    writers = {
        "csv": lambda: frame.to_csv(path, index=False),
        "csv.gz": lambda: frame.to_csv(path, index=False, compression="gzip"),
        "tsv": lambda: frame.to_csv(path, index=False, sep="\t"),
        "json": lambda: frame.to_json(path, orient="records"),
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "parquet": lambda: frame.to_parquet(path),
    }
    writers[fmt]()
    assert infer_input_format(str(path)) == fmt
    config = ShardConfig(output=str(tmp_path / "o"), input_format=fmt, url_col="URL", caption_col="TEXT")
    info = inspect_url_list(config, str(path))
    assert info.columns == ("URL", "TEXT") and info.rows == 7
    assert info.expected_shards(samples_per_shard=3) == 3


def test_a_folder_of_url_lists_counts_shards_per_file(tmp_path):
    for name, rows in (("a.parquet", 5), ("b.parquet", 4)):
        pq.write_table(pa.table({"url": ["http://x/y.jpg"] * rows, "caption": ["c"] * rows}), tmp_path / name)
    info = inspect_url_list(ShardConfig(output=str(tmp_path / "o")), str(tmp_path))
    # img2dataset never lets a shard span two input files: 5 -> 2 shards, 4 -> 1 shard.
    assert info.rows == 9 and info.expected_shards(samples_per_shard=4) == 3
