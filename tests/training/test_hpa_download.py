"""``locus hpa-download`` against a loopback HTTP server that serves HPA-sim fields with injected faults.

The server holds tinted JPEGs (as the HPA website serves them) and ``.tif.gz`` files made
from HPA-sim fields, and misbehaves on purpose: 404, 500 then success, a truncated body,
a response slower than the client's timeout, a JPEG that does not decode. The download
must end with every good field in the Kaggle layout, pixel-equal to its source, the bad
ones listed, and a second run fetching nothing.
"""

from __future__ import annotations

import csv
import gzip
import http.server
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from locus.cli import main
from locus.service.classes import CHANNELS, CLASS_NAMES, NUM_CLASSES
from locus.service.imaging import ImageError
from locus.service.readers import find_fields
from locus.training.hpa_download import (
    Fetcher,
    FetchError,
    field_id,
    read_index,
    resolve_url,
    select_rows,
    tiff_gz_channel,
    tinted_jpeg_channel,
    tinted_jpeg_to_channel,
)
from locus.training.hpa_locations import (
    KAGGLE_CELL_LINES,
    LOCATION_CLASSES,
    UnknownLocationError,
    location_class,
    locations_to_classes,
    parse_class_filter,
)
from locus.training.sim.generator import SimConfig, generate_field

SIZE = 256
BGR_PLANES = {"red": (2,), "green": (1,), "blue": (0,), "yellow": (1, 2)}  # OpenCV's order, for encoding
RGB_PLANES = {"red": (0,), "green": (1,), "blue": (2,), "yellow": (0, 1)}
TIMEOUT = 0.4

# ---------------------------------------------------------------------------------------------- location table

#: The Kaggle 2021 rules, written out independently of the code: every name the table holds must be here.
EXPECTED_LOCATIONS: dict[str, int | None] = {
    "Nucleoplasm": 0,
    "Nuclear membrane": 1,
    "Nucleoli": 2,
    "Nucleoli fibrillar center": 3,
    "Nuclear speckles": 4,
    "Nuclear bodies": 5,
    "Endoplasmic reticulum": 6,
    "Golgi apparatus": 7,
    "Intermediate filaments": 8,
    "Actin filaments": 9,
    "Focal adhesion sites": 9,
    "Microtubules": 10,
    "Mitotic spindle": 11,
    "Centrosome": 12,
    "Centriolar satellite": 12,
    "Plasma membrane": 13,
    "Cell Junctions": 13,
    "Mitochondria": 14,
    "Aggresome": 15,
    "Cytosol": 16,
    "Vesicles": 17,
    "Peroxisomes": 17,
    "Endosomes": 17,
    "Lysosomes": 17,
    "Lipid droplets": 17,
    "Cytoplasmic bodies": 17,
    "No staining": 18,
    # HPA locations the 19-class task has no class for
    "Nucleoli rim": None,
    "Kinetochore": None,
    "Mitotic chromosome": None,
    "Nucleus": None,
    "Microtubule ends": None,
    "Cytokinetic bridge": None,
    "Midbody": None,
    "Midbody ring": None,
    "Cleavage furrow": None,
    "Microtubule organizing center": None,
    "Primary cilium": None,
    "Primary cilium tip": None,
    "Primary cilium transition zone": None,
    "Basal body": None,
    "Rods & Rings": None,
}


@pytest.mark.parametrize("name", sorted(LOCATION_CLASSES))
def test_every_location_name_maps_as_the_kaggle_rules_say(name):
    assert name in EXPECTED_LOCATIONS, f"{name} is in the table but not in the test's rules"
    assert location_class(name) == EXPECTED_LOCATIONS[name]
    assert location_class(f"  {name.upper()} ") == EXPECTED_LOCATIONS[name]  # case and spaces do not matter


def test_location_table_covers_every_class_and_reads_filters():
    assert set(EXPECTED_LOCATIONS) == set(LOCATION_CLASSES)
    assert {c for c in LOCATION_CLASSES.values() if c is not None} == set(range(NUM_CLASSES))
    for i, name in enumerate(CLASS_NAMES):  # the 19 class names themselves are accepted too
        assert location_class(name) == i
    assert locations_to_classes(["Cytosol", "Peroxisomes", "Midbody", "Cytosol"]) == ([16, 17], ["Midbody"])
    assert locations_to_classes(["Bogus"]) == ([], ["Bogus"])
    with pytest.raises(UnknownLocationError, match="Bogus"):
        locations_to_classes(["Bogus"], strict=True)
    assert parse_class_filter(["6", "Golgi apparatus", "Focal adhesion sites,Negative"]) == {6, 7, 9, 18}
    for bad in (["19"], ["Midbody"], ["Bogus"]):
        with pytest.raises(ValueError):
            parse_class_filter(bad)
    assert len(KAGGLE_CELL_LINES) == 17 and "U-2 OS" in KAGGLE_CELL_LINES


# ---------------------------------------------------------------------------------------------- index


def test_read_index_csv_tsv_and_prefix_list(tmp_path):
    rows = [
        ["Image", "Label", "Cellline", "in_trainset", "Label_idx"],
        ["https://images.proteinatlas.org/10005/921_B9_1", "Cytosol,Nucleoplasm", "U-2 OS", "False", "16|0"],
        ["https://images.proteinatlas.org/10005/921_B9_2", "Peroxisomes,Midbody", "HeLa", "True", ""],
        ["https://images.proteinatlas.org/77/1_A1_1", "Midbody", "A549", "False", ""],
    ]
    for name, delim in (("a.tsv", "\t"), ("b.tsv", ",")):
        with open(tmp_path / name, "w", newline="") as fh:
            csv.writer(fh, delimiter=delim).writerows(rows)
        got = read_index(tmp_path / name)
        assert [r.id for r in got] == ["10005_921_B9_1", "10005_921_B9_2", "77_1_A1_1"]
        assert got[0].labels == (0, 16) and got[0].cell_line == "U-2 OS" and not got[0].in_trainset
        assert got[1].labels == (17,) and got[1].in_trainset and got[1].unmapped == ("Midbody",)  # from names
        assert got[2].labels is None
    sel, dropped = select_rows(got)
    assert [r.id for r in sel] == ["10005_921_B9_1"]
    assert dropped == {"in Kaggle train set": 1, "no class label": 1}
    sel, _ = select_rows(got, include_trainset=True, classes={17})
    assert [r.id for r in sel] == ["10005_921_B9_2"]
    sel, dropped = select_rows(got, include_trainset=True, cell_lines=["hela", "u-2 os"], limit=1)
    assert [r.id for r in sel] == ["10005_921_B9_1"] and dropped["over --limit"] == 1
    (tmp_path / "list.txt").write_text("# prefixes\n10005/921_B9_1\n\nhttps://x.org/a/b_1  # comment\n")
    got = read_index(tmp_path / "list.txt")
    assert [(r.id, r.labels) for r in got] == [("10005_921_B9_1", None), ("a_b_1", None)]


def test_field_id_and_urls():
    assert field_id("https://images.proteinatlas.org/10005/921_B9_1") == "10005_921_B9_1"
    assert field_id("10005/921_B9_1") == "10005_921_B9_1"
    url = "https://images.proteinatlas.org/10005/921_B9_1"
    assert resolve_url(url) == url
    assert resolve_url(url, "http://127.0.0.1:9/mirror/") == "http://127.0.0.1:9/mirror/10005/921_B9_1"
    assert resolve_url("10005/921_B9_1") == url


# ---------------------------------------------------------------------------------------------- conversion


def tinted_jpeg(channel: np.ndarray, color: str, quality: int = 90) -> bytes:
    """A tinted 3-component JPEG as the HPA website serves it (red in R, ..., yellow in R+G)."""
    bgr = np.zeros((*channel.shape, 3), np.uint8)
    for plane in BGR_PLANES[color]:
        bgr[:, :, plane] = channel
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def tif_gz(channel: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".tif", channel)
    assert ok
    return gzip.compress(buf.tobytes())


def recovers(channel: np.ndarray, source: np.ndarray) -> bool:
    """The tint is undone: the channel follows its source (JPEG loses detail on a dim channel, not its range)."""
    a, b = channel.astype(float).ravel(), source.astype(float).ravel()
    return np.corrcoef(a, b)[0, 1] > 0.9 and 0.95 < a.mean() / b.mean() < 1.05  # a wrong plane: ~0


def own_plane(jpeg: bytes, color: str) -> np.ndarray:
    """The test's own reading of a tinted JPEG: decode (the service's decoder), take the channel's planes."""
    import simplejpeg

    img = simplejpeg.decode_jpeg(jpeg, colorspace="RGB", strict=True)
    return img[:, :, list(RGB_PLANES[color])].max(axis=2)


def test_conversions_and_their_refusals():
    # A field with a bright protein stain (nucleoplasm, speckles, cytosol): on a dim channel JPEG keeps the range
    # but not the detail, and the correlation below would measure the codec, not the conversion.
    field = generate_field(3, 5, SimConfig(size=SIZE))
    assert field.image[:, :, 1].mean() > 15
    for i, color in enumerate(CHANNELS):
        src = field.image[:, :, i]
        data = tinted_jpeg(src, color)
        got = tinted_jpeg_channel(data, color)
        assert got.dtype == np.uint8 and np.array_equal(got, own_plane(data, color))
        assert recovers(got, src), color
        assert np.array_equal(tiff_gz_channel(tif_gz(src), color), src)
    src = field.image[:, :, 0]
    with pytest.raises(ImageError, match="truncated"):
        tinted_jpeg_channel(tinted_jpeg(src, "red")[:-500], "red")
    with pytest.raises(ImageError, match="not tinted"):
        tinted_jpeg_channel(tinted_jpeg(src, "green"), "red")
    with pytest.raises(ImageError):
        tinted_jpeg_channel(b"\xff\xd8\xff\xe0" + bytes(300) + b"\xff\xd9", "red")
    with pytest.raises(ImageError, match="gzip"):
        tiff_gz_channel(tif_gz(src)[:-100], "red")
    with pytest.raises(ImageError, match="gzip"):
        tiff_gz_channel(b"not gzip at all", "red")
    grey = np.dstack([src] * 3)  # a grey 3-component image reduces to the same values
    assert np.array_equal(tinted_jpeg_to_channel(grey, "yellow"), src)
    wide = generate_field(1, 5, SimConfig(size=SIZE, bit_depth=16)).image[:, :, 1]
    got = tiff_gz_channel(tif_gz(wide), "green")
    assert got.dtype == np.uint16 and np.array_equal(got, wide)


# ---------------------------------------------------------------------------------------------- the server


class FaultyServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes); ``faults`` (path -> list of faults, used in order, then normal)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.log: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hpa"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FaultyServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.removeprefix("/hpa")
        with self.server.lock:
            self.server.log.append(path)
            queue = self.server.faults.get(path)
            fault = queue.pop(0) if queue else None
            if queue is not None and fault in ("always-500", "always-truncate"):
                queue.insert(0, fault)
        body = self.server.files.get(path)
        if fault == "slow":
            time.sleep(3 * TIMEOUT)
        if fault in ("500", "always-500"):
            self.send_error(500)
            return
        if fault == "503-retry-after":
            self.send_response(503)
            self.send_header("Retry-After", "2")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body is None or fault == "404":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if fault == "stall":  # half the body, then nothing for a long time
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(30)
                return
            if fault in ("truncate", "always-truncate"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (slow response)
            pass


@pytest.fixture(scope="module")
def server():
    srv = FaultyServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


#: field -> (what is wrong, expected outcome). Prefix paths are /{folder}/{name}.
PLAN = {
    "good": "all four JPEGs fine",
    "err500": "red JPEG answers 500 once, then fine",
    "trunc": "green JPEG always truncated -> green from .tif.gz",
    "slow": "blue JPEG slower than the timeout once, then fine",
    "badjpg": "yellow JPEG does not decode -> yellow from .tif.gz",
    "tif16": "no JPEGs at all: 16-bit .tif.gz for every channel",
    "gone": "red: JPEG and TIFF both 404 -> field fails",
    "broken": "green: JPEG does not decode and TIFF answers 500 every time -> field fails",
}
GOOD = ["good", "err500", "trunc", "slow", "badjpg", "tif16"]
BAD = ["gone", "broken"]


def _prefix(name: str) -> str:
    return f"/{100 + list(PLAN).index(name) if name in PLAN else 999}/{name}_A1_1"


@pytest.fixture(scope="module")
def dataset(server, tmp_path_factory):
    """Fill the server, write the index; returns (index path, sources, expected ids and labels)."""
    sources: dict[str, np.ndarray] = {}
    labels: dict[str, list[int]] = {}
    expected: dict[str, dict[str, np.ndarray]] = {}
    for i, name in enumerate(PLAN):
        sim = generate_field(i, 17, SimConfig(size=SIZE, bit_depth=16 if name == "tif16" else 8))
        prefix = _prefix(name)
        fid = field_id(prefix)
        sources[fid] = sim.image
        labels[fid] = sim.image_labels or [18]
        expected[fid] = {}
        for k, color in enumerate(CHANNELS):
            src = sim.image[:, :, k]
            if name != "tif16":
                server.files[f"{prefix}_{color}.jpg"] = tinted_jpeg(src, color)
                expected[fid][color] = own_plane(server.files[f"{prefix}_{color}.jpg"], color)
            server.files[f"{prefix}_{color}.tif.gz"] = tif_gz(src)
    fid = {name: field_id(_prefix(name)) for name in PLAN}
    p = _prefix
    server.faults[f"{p('err500')}_red.jpg"] = ["500"]
    server.faults[f"{p('trunc')}_green.jpg"] = ["always-truncate"]
    expected[fid["trunc"]]["green"] = sources[fid["trunc"]][:, :, 1]
    server.faults[f"{p('slow')}_blue.jpg"] = ["slow"]
    server.files[f"{p('badjpg')}_yellow.jpg"] = b"\xff\xd8\xff\xe0" + bytes(2000) + b"\xff\xd9"
    expected[fid["badjpg"]]["yellow"] = sources[fid["badjpg"]][:, :, 3]
    for k, color in enumerate(CHANNELS):
        expected[fid["tif16"]][color] = sources[fid["tif16"]][:, :, k]
    del server.files[f"{p('gone')}_red.jpg"], server.files[f"{p('gone')}_red.tif.gz"]
    server.files[f"{p('broken')}_green.jpg"] = b"garbage, not a JPEG"
    server.faults[f"{p('broken')}_green.tif.gz"] = ["always-500"]

    index = tmp_path_factory.mktemp("index") / "kaggle_2021.tsv"
    with open(index, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image", "Label", "Cellline", "in_trainset", "Label_idx"])
        for n, name in enumerate(PLAN):
            names = ",".join(CLASS_NAMES[c] if c != 18 else "No staining" for c in labels[fid[name]])
            idx = "" if n % 2 else "|".join(str(c) for c in labels[fid[name]])  # half from names only
            w.writerow([f"https://images.proteinatlas.org{_prefix(name)}", names, "U-2 OS", "False", idx])
        # rows the filters drop: in the Kaggle train set, another cell line, no class
        w.writerow(["https://images.proteinatlas.org/900/intrain_A1_1", "Cytosol", "U-2 OS", "True", "16"])
        w.writerow(["https://images.proteinatlas.org/901/otherline_A1_1", "Cytosol", "NotACellLine", "False", "16"])
        w.writerow(["https://images.proteinatlas.org/902/nolabel_A1_1", "Midbody", "U-2 OS", "False", ""])
    return index, sources, expected, {fid[n]: labels[fid[n]] for n in PLAN}, fid


def _cli(index: Path, out: Path, server: FaultyServer, *extra: str, status: int = 0) -> dict:
    code = main(
        [
            "hpa-download",
            str(index),
            "--out",
            str(out),
            "--base-url",
            server.url,
            "--kaggle-cell-lines",
            "--workers",
            "4",
            "--retries",
            "2",
            "--timeout",
            str(TIMEOUT),
            "--backoff",
            "0.01",
            "--quiet",
            *extra,
        ]
    )
    assert code == status
    return json.loads((out / "download.json").read_text())


@pytest.fixture(scope="module")
def downloaded(server, dataset, tmp_path_factory):
    index, *_ = dataset
    out = tmp_path_factory.mktemp("hpa") / "public"
    n_before = len(server.log)
    t0 = time.perf_counter()
    report = _cli(index, out, server)
    seconds = time.perf_counter() - t0
    return out, report, server.log[n_before:], seconds


def test_download_writes_every_good_field_pixel_equal(downloaded, dataset):
    out, report, _, _ = downloaded
    _, sources, expected, labels, fid = dataset
    assert report["selected"] == len(PLAN) and report["downloaded"] == len(GOOD) and report["skipped"] == 0
    assert report["dropped"] == {"in Kaggle train set": 1, "cell line": 1, "no class label": 1}
    for name in GOOD:
        ident = fid[name]
        for color in CHANNELS:
            png = cv2.imread(str(out / f"{ident}_{color}.png"), cv2.IMREAD_UNCHANGED)
            want = expected[ident][color]
            assert png.dtype == want.dtype and png.shape == (SIZE, SIZE), (name, color)
            assert np.array_equal(png, want), (name, color)
    # tif16 stayed 16-bit and exact; the JPEG fields are the tinted source up to JPEG error
    assert cv2.imread(str(out / f"{fid['tif16']}_red.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    good_jpeg = cv2.imread(str(out / f"{fid['good']}_green.png"), cv2.IMREAD_UNCHANGED)
    assert recovers(good_jpeg, sources[fid["good"]][:, :, 1])
    assert report["channels"] == {"jpg": 4 * 5 - 2, "tif.gz": 2 + 4}
    for name in BAD:
        assert not list(out.glob(f"{fid[name]}_*.png")), f"{name}: a failed field must leave no files"
    assert not list(out.glob(".*")), "temporary files left behind"


def test_download_lists_failures_and_train_csv(downloaded, dataset):
    out, report, log, _ = downloaded
    *_, labels, fid = dataset
    with open(out / "failures.csv") as fh:
        failures = {r["id"]: r for r in csv.DictReader(fh)}
    assert set(failures) == {fid[n] for n in BAD} and len(report["failed"]) == 2
    assert failures[fid["gone"]]["channel"] == "red" and "HTTP 404" in failures[fid["gone"]]["reason"]
    broken = failures[fid["broken"]]
    assert (
        broken["channel"] == "green"
        and "jpg:" in broken["reason"]
        and "HTTP 500 (after 3 attempts)" in broken["reason"]
    )
    refs = find_fields(out)
    assert [r.id for r in refs] == sorted(fid[n] for n in GOOD)
    for ref in refs:
        assert ref.labels == sorted(labels[ref.id])
    with open(out / "train.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["Cellline"] for r in rows} == {"U-2 OS"} and all(r["Image"].startswith("https://") for r in rows)
    # the faults were met and retried as planned
    p = _prefix
    assert log.count(f"{p('err500')}_red.jpg") == 2
    assert log.count(f"{p('slow')}_blue.jpg") == 2
    assert log.count(f"{p('trunc')}_green.jpg") == 3 and log.count(f"{p('trunc')}_green.tif.gz") == 1
    assert log.count(f"{p('badjpg')}_yellow.jpg") == 1  # a JPEG that does not decode is not fetched again
    assert log.count(f"{p('gone')}_red.jpg") == 1 and log.count(f"{p('gone')}_red.tif.gz") == 1  # 404 is final
    assert not any("intrain" in x or "otherline" in x or "nolabel" in x for x in log)
    assert report["retries"] == 1 + 1 + 2 + 2  # 500 once, slow once, truncated twice, TIFF 500 twice


def test_second_run_downloads_nothing_new(downloaded, dataset, server):
    out, first, _, _ = downloaded
    index, *_, fid = dataset
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    n_before = len(server.log)
    report = _cli(index, out, server, "--strict", status=1)  # --strict: failures give status 1
    log = server.log[n_before:]
    assert report["downloaded"] == 0 and report["skipped"] == len(GOOD) and report["channels"] == {}
    assert len(report["failed"]) == 2  # the failed ones are tried again (and fail again)
    assert not any(any(f"/{fid[n].split('_', 1)[1]}_" in x for n in GOOD) for x in log), log
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps
    with open(out / "train.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(GOOD)


def test_resume_after_a_lost_channel_fetches_only_that_channel(downloaded, dataset, server, tmp_path):
    out, *_ = downloaded
    index, _, expected, _, fid = dataset
    copy = tmp_path / "copy"
    copy.mkdir()
    ident = fid["good"]
    for color in ("red", "green", "blue"):
        (copy / f"{ident}_{color}.png").write_bytes((out / f"{ident}_{color}.png").read_bytes())
    n_before = len(server.log)
    report = _cli(index, copy, server, "--limit", "1")
    assert server.log[n_before:] == [f"{_prefix('good')}_yellow.jpg"]
    assert report["downloaded"] == 1 and report["channels"] == {"jpg": 1}
    png = cv2.imread(str(copy / f"{ident}_yellow.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(png, expected[ident]["yellow"])


def test_download_throughput_on_loopback(downloaded):
    """Prints the numbers (not asserted: timing depends on the machine)."""
    _, report, _, seconds = downloaded
    print(
        f"\nloopback: {report['downloaded']} fields ({SIZE}²) + {len(report['failed'])} failures in {seconds:.2f} s, "
        f"{report['bytes'] / 1e6:.2f} MB at {report['mb_per_s']:.2f} MB/s, {report['requests']} requests "
        f"(includes a {TIMEOUT} s timeout and the retries)"
    )
    assert report["bytes"] > 0


def test_fetcher_backs_off_honours_retry_after_and_gives_up(server):
    waits: list[float] = []
    fetcher = Fetcher(timeout=TIMEOUT, retries=3, backoff=0.01, max_backoff=5.0, sleep=waits.append)
    server.files["/x/a.jpg"] = b"ok"
    server.faults["/x/a.jpg"] = ["500", "500", "500"]
    assert fetcher.get(f"{server.url}/x/a.jpg") == b"ok"
    assert len(waits) == 3 and waits[0] < waits[1] < waits[2] <= 0.05  # doubling, with jitter
    waits.clear()
    server.files["/x/b.jpg"] = b"ok"
    server.faults["/x/b.jpg"] = ["503-retry-after"]
    assert fetcher.get(f"{server.url}/x/b.jpg") == b"ok"
    assert waits == [2.0]  # the server's Retry-After, over the backoff
    waits.clear()
    with pytest.raises(FetchError, match="HTTP 404") as exc:
        fetcher.get(f"{server.url}/x/missing.jpg")
    assert not exc.value.retryable and waits == []  # 404: no retry
    with pytest.raises(FetchError, match="connection failed"):
        Fetcher(timeout=TIMEOUT, retries=0).get("http://127.0.0.1:9/nothing")  # port 9: refused


# ---------------------------------------------------------------------------------------------- segment + train


@pytest.mark.slow
@pytest.mark.train
def test_segment_then_train_on_the_downloaded_set(downloaded, tmp_path, monkeypatch):
    """``locus segment`` then ``locus train`` (tiny config) on the downloaded fields; the service loads the model."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    import locus.training.dataset as dataset_mod
    from locus.service.inference import Classifier
    from locus.training.segment_cache import label_paths

    out, *_ = downloaded
    data = tmp_path / "data"
    data.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (data / f.name).write_bytes(f.read_bytes())
    assert main(["segment", str(data), "--quiet"]) == 0
    for ref in find_fields(data):
        cells = cv2.imread(str(label_paths(data, ref.id)[0]), cv2.IMREAD_UNCHANGED)
        assert cells.dtype == np.uint16 and cells.shape == (SIZE, SIZE)

    def no_segmenting(*args, **kwargs):  # every field has stored labels: training must not segment again
        raise AssertionError("training segmented a field that locus segment had stored")

    monkeypatch.setattr(dataset_mod, "_segment", no_segmenting)
    config = {
        "train_dirs": [str(data)],
        "label_source": "image",
        "segmenter": "classical",
        "architecture": "b0",
        "input_size": 32,
        "batch_size": 8,
        "epochs": 1,
        "max_steps_per_epoch": 2,
        "workers": 1,
        "out": str(tmp_path / "run"),
        "name": "tiny-hpa-download",
        "with_grad": False,
        "plots": False,
        "verbose": 0,
    }
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "tiny.json")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["fields"] == len(GOOD) and summary["data"]["cells"] > 0
    assert not summary["data"]["synthetic"]
    clf = Classifier(tmp_path / "run" / "model")  # the service's loader accepts the model folder
    assert clf.crop_rule.size == 32


def test_real_hpa_website_jpegs_convert(sample_dir):
    """The real sample (../shared/hpa-samples): each channel passes the tint check and matches the service."""
    from locus.service.imaging import decode_channel

    for color in CHANNELS:
        data = (sample_dir / f"89_B5_1_{color}.jpg").read_bytes()
        own = tinted_jpeg_channel(data, color)
        served = decode_channel(data, field=color)  # the service: max over the colour planes
        assert own.shape == served.shape == (1728, 1728) and np.all(own <= served)
        assert np.abs(served.astype(int) - own).mean() < 0.1  # they differ only by JPEG colour noise


def test_killed_run_leaves_no_partial_file_and_resumes(server, dataset, tmp_path):
    """SIGKILL while a body is half received: every PNG on disk is whole, the next run completes the set."""
    import signal
    import subprocess
    import sys

    index, _, expected, _, fid = dataset
    out = tmp_path / "killed"
    stalled = f"{_prefix('slow')}_green.jpg"
    server.faults[stalled] = ["stall"]
    n_before = len(server.log)
    argv = [sys.executable, "-m", "locus.cli", "hpa-download", str(index), "--out", str(out), "--base-url", server.url]
    argv += ["--workers", "2", "--timeout", "20", "--backoff", "0.01", "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while stalled not in server.log[n_before:] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalled in server.log[n_before:], "the download never reached the stalled file"
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    for png in out.glob("*.png"):  # whatever was written is complete
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None, png.name
    assert not (out / f"{fid['slow']}_green.png").exists()
    report = _cli(index, out, server)
    assert report["downloaded"] + report["skipped"] == len(GOOD)
    for name in GOOD:
        for color in CHANNELS:
            png = cv2.imread(str(out / f"{fid[name]}_{color}.png"), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(png, expected[fid[name]][color]), (name, color)
    assert not list(out.glob(".*")), "temporary files left behind"


def test_exit_status_when_nothing_succeeds(dataset, tmp_path, capsys):
    index, *_ = dataset
    argv = ["hpa-download", str(index), "--out", str(tmp_path / "x"), "--base-url", "http://127.0.0.1:9"]
    assert main([*argv, "--limit", "1", "--retries", "0", "--quiet"]) == 1  # port 9: connection refused
    assert "connection failed" in capsys.readouterr().out
    assert main([*argv, "--dry-run", "--kaggle-cell-lines"]) == 0
    assert "to fetch: 8 fields" in capsys.readouterr().out
