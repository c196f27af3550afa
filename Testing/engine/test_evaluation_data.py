"""Datasets, label maps, sample data (installed and downloaded with checksums), pseudo-scans."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import lzma
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from protosam.errors import InputError, IntegrityError
from protosam.evaluation import sample_data
from protosam.evaluation.datasets import LABEL_MAPS, ScanCache, discover_scans, parse_label_map
from protosam.evaluation.protocol import organ_slice_list
from protosam.evaluation.pseudo_scans import DEFAULT_SCANS, build_pseudo_dataset
from protosam.evaluation.sample_data import (
    FILE_SHA256,
    MRICRON_DATA_DEB,
    DebSource,
    SampleDataUnavailableError,
    download_sample,
    find_installed_sample,
    get_sample,
    read_label_names,
)

TEMPLATES = Path("/usr/share/mricron/templates")


@pytest.fixture(scope="module")
def installed():
    sample = find_installed_sample()
    if sample is None:
        pytest.fail("Colin27/AAL not found: install Debian's mricron-data (apt-get install mricron-data).")
    return sample


def _write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


# ------------------------------------------------------------------------------------ label maps
def test_label_maps_of_the_public_datasets():
    assert parse_label_map("synapse") == {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6}
    assert parse_label_map("CHAOS") == {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    assert parse_label_map('{"liver": 7, "tumour": 8}') == {"liver": 7, "tumour": 8}
    with pytest.raises(ValueError, match="positive integer"):
        parse_label_map('{"liver": 0}')
    with pytest.raises(ValueError, match="neither a preset"):
        parse_label_map("no-such-map")


def test_label_map_from_a_json_file(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"spleen": 4}))
    assert parse_label_map(str(path)) == {"spleen": 4}


# ------------------------------------------------------------------------------------ datasets
def test_discover_layouts_and_numeric_order(tmp_path):
    volume = np.zeros((3, 4, 5), np.int16)
    for scan_id in ("10", "2", "1"):
        _write_volume(tmp_path / f"image_{scan_id}.nii.gz", volume)
        _write_volume(tmp_path / f"label_{scan_id}.nii.gz", volume.astype(np.uint8))
    _write_volume(tmp_path / "image_99.nii.gz", volume)  # no label: skipped
    assert [s.scan_id for s in discover_scans(tmp_path)] == ["1", "2", "10"]

    nnunet = tmp_path / "nn"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    _write_volume(nnunet / "imagesTr" / "case_7_0000.nii.gz", volume)
    _write_volume(nnunet / "labelsTr" / "case_7.nii.gz", volume.astype(np.uint8))
    found = discover_scans(nnunet)
    assert [(s.scan_id, s.image.name) for s in found] == [("case_7", "case_7_0000.nii.gz")]
    with pytest.raises(InputError, match="No image/label"):
        discover_scans(tmp_path / "nn" / "imagesTr")


def test_scan_cache_normalisation_by_hand(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # mean 11.5
    b = np.full((2, 3, 4), 100.0, np.float32)
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[1, 1, 1] = 6
    for scan_id, image in (("1", a), ("2", b)):
        _write_volume(tmp_path / f"image_{scan_id}.nii.gz", image)
        _write_volume(tmp_path / f"label_{scan_id}.nii.gz", labels)
    files = discover_scans(tmp_path)
    volume = ScanCache(files, "volume").get("1")
    assert volume.image.mean() == pytest.approx(0.0, abs=1e-6)
    assert volume.image.std() == pytest.approx(1.0, abs=1e-5)
    assert volume.mask(6).sum() == 1 and volume.spacing_kji == (2.0, 1.0, 1.0)
    dataset = ScanCache(files, "dataset")
    both = np.concatenate([a.ravel(), b.ravel()]).astype(np.float64)
    mean, std = both.mean(), both.std()
    assert dataset.get("2").image[0, 0, 0] == pytest.approx((100 - mean) / std, rel=1e-5)
    assert (dataset.dataset_mean, dataset.dataset_std) == (pytest.approx(mean), pytest.approx(std))
    assert ScanCache(files, "none").get("2").image.max() == 100.0


def test_read_scan_rejects_mismatched_label(tmp_path):
    _write_volume(tmp_path / "image_1.nii.gz", np.zeros((3, 4, 5), np.int16))
    _write_volume(tmp_path / "label_1.nii.gz", np.zeros((3, 4, 6), np.uint8))
    with pytest.raises(InputError, match="label shape"):
        ScanCache(discover_scans(tmp_path)).get("1")


# ------------------------------------------------------------------------------------ sample data
def test_installed_sample_geometry_and_checksums(installed):
    image = sitk.ReadImage(str(installed.image))
    atlas = sitk.ReadImage(str(installed.labels))
    assert image.GetSize() == atlas.GetSize() == (181, 217, 181)
    assert image.GetSpacing() == atlas.GetSpacing() == (1.0, 1.0, 1.0)
    assert image.GetOrigin() == atlas.GetOrigin() == (90.0, 125.0, -71.0)
    assert image.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    names = read_label_names(installed.names)
    assert len(names) == 116 and names[77] == "Thalamus_L" and names[78] == "Thalamus_R"
    for path in (installed.image, installed.labels, installed.names):
        assert sample_data.sha256_of(path) == FILE_SHA256[path.name]
    # The recorded hashes describe the files of the Debian package (its own md5sums list).
    md5sums = Path("/var/lib/dpkg/info/mricron-data.md5sums")
    if md5sums.is_file():
        listed = dict(line.split()[::-1] for line in md5sums.read_text().splitlines())
        for path in (installed.image, installed.labels, installed.names):
            assert hashlib.md5(path.read_bytes()).hexdigest() == listed[str(path).lstrip("/")]


def test_no_sample_without_package_or_download(tmp_path):
    assert find_installed_sample([tmp_path]) is None
    with pytest.raises(SampleDataUnavailableError, match="mricron-data"):
        get_sample(download=False, search_dirs=[tmp_path], cache_dir=tmp_path / "cache")


def _deb_bytes(files: dict, xz: bool = True) -> bytes:
    """A Debian package (ar: debian-binary, control.tar.xz, data.tar[.xz]) holding ``files``."""
    def tar(entries, compress):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as archive:
            for name, data in entries.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return lzma.compress(raw.getvalue(), preset=0) if compress else raw.getvalue()

    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar({"./control": b"Package: x\n"}, True)),
               ("data.tar.xz" if xz else "data.tar", tar(files, xz))]
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, data in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out.write(header + data + (b"\n" if len(data) % 2 else b""))
    return out.getvalue()


@pytest.fixture(scope="module")
def deb_server(installed):
    """Serves a .deb with the installed Colin27/AAL files, and a tampered one, on 127.0.0.1."""
    files = {f"./usr/share/mricron/templates/{p.name}": p.read_bytes()
             for p in (installed.image, installed.labels, installed.names)}
    good = _deb_bytes(files)
    bad_files = dict(files)
    bad_files["./usr/share/mricron/templates/aal.nii.gz"] = b"not the atlas"
    bad = _deb_bytes(bad_files, xz=False)  # also the uncompressed payload variant
    payloads = {"/good.deb": good, "/bad.deb": bad}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = payloads.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", payloads
    server.shutdown()
    server.server_close()


def _source(urls, payload):
    return DebSource(file_name="mricron-data_test_all.deb", urls=tuple(urls), size=len(payload),
                     sha256=hashlib.sha256(payload).hexdigest(), member_dir=MRICRON_DATA_DEB.member_dir,
                     file_sha256=MRICRON_DATA_DEB.file_sha256)


def test_download_extracts_and_verifies_the_sample(deb_server, tmp_path):
    base, payloads = deb_server
    # The first mirror is missing (HTTP 404): the second one is used.
    source = _source([f"{base}/missing.deb", f"{base}/good.deb"], payloads["/good.deb"])
    seen = []
    sample = download_sample(tmp_path, source=source, progress=lambda done, total: seen.append((done, total)))
    assert sample.source.startswith("download:")
    for path in (sample.image, sample.labels, sample.names):
        assert sample_data.sha256_of(path) == FILE_SHA256[path.name]
    assert not (tmp_path / source.file_name).exists()  # the package is removed after extraction
    assert seen[-1] == (len(payloads["/good.deb"]), len(payloads["/good.deb"]))
    # A second call finds the verified cache and does not download again.
    again = download_sample(tmp_path, source=_source([f"{base}/missing.deb"], payloads["/good.deb"]))
    assert again.source.startswith("cache:")


def test_download_refuses_files_that_differ_from_the_published_ones(deb_server, tmp_path):
    base, payloads = deb_server
    # The package checksum is the published one but a member file was altered.
    with pytest.raises(IntegrityError, match="aal.nii.gz"):
        download_sample(tmp_path / "a", source=_source([f"{base}/bad.deb"], payloads["/bad.deb"]))
    assert not (tmp_path / "a" / "aal.nii.gz").exists()
    # The server sends another package than the published one.
    with pytest.raises(IntegrityError, match="does not match the published file"):
        download_sample(tmp_path / "b", source=_source([f"{base}/bad.deb"], payloads["/good.deb"]))
    assert not any((tmp_path / "b").glob("*.deb")) and not any((tmp_path / "b").glob(".part-*"))
    # Nothing answers at all.
    with pytest.raises(SampleDataUnavailableError, match="could not be downloaded"):
        download_sample(tmp_path / "c", source=_source([f"{base}/missing.deb"], payloads["/good.deb"]))
    with pytest.raises(ValueError, match="only https"):
        download_sample(tmp_path / "d", source=_source(["http://example.org/x.deb"], payloads["/good.deb"]))


def test_published_package_record():
    assert MRICRON_DATA_DEB.urls[0].startswith("https://deb.debian.org/debian/pool/main/m/mricron/")
    assert MRICRON_DATA_DEB.size == 16122652
    assert MRICRON_DATA_DEB.sha256 == "d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f"


# ------------------------------------------------------------------------------------ pseudo-scans
def test_pseudo_dataset_from_colin27_and_aal(installed, tmp_path):
    description = build_pseudo_dataset(installed, tmp_path, slice_range=(80, 96))
    files = discover_scans(tmp_path)
    assert [f.scan_id for f in files] == [s.scan_id for s in DEFAULT_SCANS]
    cache = ScanCache(files, "none")
    atlas = sitk.GetArrayFromImage(sitk.ReadImage(str(installed.labels)))
    colin = sitk.GetArrayFromImage(sitk.ReadImage(str(installed.image))).astype(np.float32)
    left_even, right_even = cache.get("1"), cache.get("3")
    assert left_even.image.shape == (8, 217, 90)  # slices 80, 82, ..., 94; columns 0..89
    assert left_even.spacing_kji == (2.0, 1.0, 1.0)
    # Real voxels: the left scan is Colin27 itself, the right scan its mirrored other half.
    np.testing.assert_array_equal(left_even.image, colin[80:96:2, :, :90])
    np.testing.assert_array_equal(right_even.image, colin[80:96:2, :, 91:][:, :, ::-1])
    assert np.array_equal(cache.get("2").image, colin[81:96:2, :, :90])
    synapse = LABEL_MAPS["synapse"]
    np.testing.assert_array_equal(left_even.label == synapse["spleen"], atlas[80:96:2, :, :90] == 77)
    np.testing.assert_array_equal(right_even.label == synapse["spleen"], atlas[80:96:2, :, 91:][:, :, ::-1] == 78)
    # Thalamus covers z 69..91: slices 0..5 of the even scan (z 80..90).
    assert organ_slice_list(left_even.label, synapse["spleen"]) == [0, 1, 2, 3, 4, 5]
    assert description["scans"]["3"]["regions"]["spleen"] == ["Thalamus_R"]
    assert len(description["scans"]["1"]["regions"]["liver"]) == 9  # the cerebellar hemisphere
    with pytest.raises(ValueError, match="not organs"):
        build_pseudo_dataset(installed, tmp_path / "x", stand_ins={"brain": ("Thalamus",)})


def test_structure_names_cannot_escape_the_output_folder():
    import pytest

    from protosam.evaluation.datasets import parse_label_map

    assert parse_label_map('{"left kidney": 3, "Liver.v2": 6}') == {"left kidney": 3, "Liver.v2": 6}
    for bad in ('{"../../etc/x": 1}', '{"a/b": 1}', '{"..": 2}', '{"": 1}'):
        with pytest.raises(ValueError, match="becomes part of output file names"):
            parse_label_map(bad)
