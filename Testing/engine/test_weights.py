"""Weights registry, cache and downloads, tested against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from protosam.errors import CancelledError, CheckpointError, IntegrityError, WeightsUnavailableError
from protosam.weights import (
    cache_path,
    cache_status,
    download,
    home_dir,
    resolve_checkpoint,
    verify_file,
    weights_dir,
)
from protosam.cli.weights import add_subcommands
from protosam.weights.registry import REGISTRY, TEST_ONLY_ARCHITECTURES, WeightsEntry, is_allowed_url

try:
    from http_fixtures import LocalHTTPServer, Route, unused_loopback_url
except ImportError:  # Testing/engine collected as a package
    from .http_fixtures import LocalHTTPServer, Route, unused_loopback_url

PAYLOAD = random.Random(1234).randbytes(300_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def entry_for(url: str, *, name: str = "tiny_sam", body: bytes = PAYLOAD, size=True, sha=True) -> WeightsEntry:
    return WeightsEntry(
        name=name, family="sam", architecture="sam_tiny", file_name=f"{name}.pth", url=url,
        size=len(body) if size else None, sha256=hashlib.sha256(body).hexdigest() if sha else None,
    )


@pytest.fixture
def server():
    with LocalHTTPServer({}, lifetime=60.0) as srv:
        yield srv


def served(server: LocalHTTPServer, route: Route, path: str = "/w/tiny_sam.pth") -> WeightsEntry:
    server.routes[path] = route
    return entry_for(server.url(path))


# ----------------------------------------------------------------------------- registry
def test_registry_has_the_engine_names():
    sam2 = {f"sam2.1_hiera_{s}" for s in ("tiny", "small", "base_plus", "large")} | {"medsam2"}
    expected = {f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg4")} | {"vit_b", "vit_l", "vit_h", "medsam_vit_b"}
    assert set(REGISTRY) == expected | sam2
    for name, entry in REGISTRY.items():
        assert entry.name == entry.architecture == name
        assert entry.url.startswith("https://") and entry.url.endswith("/" + entry.file_name)
        assert entry.source
        # Downloadable entries are verified; the others say why not (no checksum could be sourced).
        assert bool(entry.size and entry.sha256) != bool(entry.local_only)
        assert bool(entry.local_only) == (name in sam2)
    assert not set(TEST_ONLY_ARCHITECTURES) & set(REGISTRY)


def test_local_only_weights_are_never_downloaded_and_the_message_says_what_to_do(tmp_path):
    """SAM 2.1 / MedSAM2: no published checksum could be sourced, so no download: the error
    names the official URL and --sam-checkpoint; an explicit file is used as given."""
    from protosam.errors import WeightsUnavailableError
    from protosam.weights import cache_status, download, resolve_checkpoint

    entry = REGISTRY["sam2.1_hiera_tiny"]
    assert entry.url == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_tiny.pt"
    assert REGISTRY["medsam2"].url == "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt"
    for call in (lambda: download(entry, tmp_path), lambda: resolve_checkpoint(entry.name, home=tmp_path)):
        with pytest.raises(WeightsUnavailableError, match="--sam-checkpoint FILE") as raised:
            call()
        assert entry.url in str(raised.value) and "does not download" in str(raised.value)
    assert not any(tmp_path.iterdir())  # nothing was written
    assert cache_status(entry, tmp_path) == "local only"
    given = tmp_path / "mine.pt"
    given.write_bytes(b"x")
    assert resolve_checkpoint(entry.name, given, home=tmp_path) == given


def test_dinov2_urls_follow_the_official_layout():
    assert REGISTRY["dinov2_vitl14_reg4"].url == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth"
    )
    for name, entry in REGISTRY.items():
        if entry.family == "dinov2":
            assert entry.file_name == f"{name}_pretrain.pth"


def test_sam_file_names_carry_an_md5_prefix_not_a_sha256_prefix():
    for name in ("vit_b", "vit_l", "vit_h"):
        entry = REGISTRY[name]
        assert entry.url == f"https://dl.fbaipublicfiles.com/segment_anything/{entry.file_name}"
        tag = entry.file_name[: -len(".pth")].rsplit("_", 1)[1]
        assert entry.md5.startswith(tag)
        assert not entry.sha256.startswith(tag)


@pytest.mark.parametrize("url,ok", [
    ("https://dl.fbaipublicfiles.com/x.pth", True),
    ("http://127.0.0.1:8000/x.pth", True),
    ("http://localhost/x.pth", True),
    ("http://[::1]:9/x.pth", True),
    ("http://dl.fbaipublicfiles.com/x.pth", False),
    ("http://10.0.0.1/x.pth", False),
    ("ftp://example.com/x.pth", False),
    ("file:///etc/passwd", False),
    ("https:///nohost", False),
])
def test_only_https_or_loopback_urls_are_allowed(url, ok):
    assert is_allowed_url(url) is ok


def test_entries_refuse_insecure_urls_and_unsafe_file_names():
    with pytest.raises(ValueError, match="refused"):
        entry_for("http://example.com/tiny_sam.pth")
    for bad in ("../evil.pth", "sub/dir.pth", ".hidden", "x.pth.part"):
        with pytest.raises(ValueError, match="plain file name"):
            WeightsEntry(name="x", family="sam", architecture="x", file_name=bad, url="https://example.com/x")
    with pytest.raises(ValueError, match="family"):
        WeightsEntry(name="x", family="clip", architecture="x", file_name="x.pth", url="https://example.com/x")


# ----------------------------------------------------------------------------- cache folder
def test_home_argument_then_environment_then_user_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOSAM_HOME", str(tmp_path / "env"))
    assert home_dir() == tmp_path / "env"
    assert home_dir(tmp_path / "arg") == tmp_path / "arg"
    assert weights_dir(tmp_path / "arg") == tmp_path / "arg" / "weights"
    monkeypatch.delenv("PROTOSAM_HOME")
    assert home_dir() == Path.home() / ".protosam"
    before = dict(os.environ)
    with pytest.raises(WeightsUnavailableError, match=str(tmp_path / "arg" / "weights")):
        resolve_checkpoint("vit_b", download=False, home=tmp_path / "arg")
    assert dict(os.environ) == before  # the home argument is never written into the environment


# ----------------------------------------------------------------------------- downloads
def test_full_download_is_verified_and_atomic(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    seen = []
    path = download(entry, tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "weights" / "tiny_sam.pth"
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name("tiny_sam.pth.part").exists()
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert cache_status(entry, tmp_path) == "verified"
    # a second call finds the verified file and does not touch the network
    assert download(entry, tmp_path) == path
    assert len(server.gets("/w/tiny_sam.pth")) == 1


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    entry = served(server, Route(PAYLOAD, cut_after=100_000, cuts=1))
    with pytest.raises(WeightsUnavailableError) as info:
        download(entry, tmp_path, retries=0)
    part = cache_path(entry, tmp_path).with_name("tiny_sam.pth.part")
    assert part.stat().st_size == 100_000 and not cache_path(entry, tmp_path).exists()
    assert "resume" in str(info.value) and str(part) in str(info.value)
    assert cache_status(entry, tmp_path) == "partial"
    path = download(entry, tmp_path)
    assert path.read_bytes() == PAYLOAD
    gets = server.gets("/w/tiny_sam.pth")
    assert [(g.range, g.status) for g in gets] == [(None, 200), ("bytes=100000-", 206)]


def test_automatic_retry_resumes_within_one_call(server, tmp_path):
    entry = served(server, Route(PAYLOAD, cut_after=70_000, cuts=2))
    path = download(entry, tmp_path, retries=3)
    assert path.read_bytes() == PAYLOAD
    assert [g.range for g in server.gets("/w/tiny_sam.pth")] == [None, "bytes=70000-", "bytes=140000-"]


def test_server_that_ignores_range_restarts_from_zero(server, tmp_path):
    entry = served(server, Route(PAYLOAD, cut_after=120_000, cuts=1, honour_range=False))
    path = download(entry, tmp_path, retries=1)
    assert path.read_bytes() == PAYLOAD
    assert [(g.range, g.status) for g in server.gets("/w/tiny_sam.pth")] == [(None, 200), ("bytes=120000-", 200)]


def test_stale_part_larger_than_the_server_file_is_discarded(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    part = weights_dir(tmp_path) / "tiny_sam.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (len(PAYLOAD) + 10))
    assert download(entry, tmp_path).read_bytes() == PAYLOAD


def test_part_from_another_file_is_refused_by_416_and_restarted(server, tmp_path):
    shorter = PAYLOAD[:50_000]
    server.routes["/w/short.pth"] = Route(shorter)
    entry = entry_for(server.url("/w/short.pth"), name="short", body=shorter, size=False)
    part = weights_dir(tmp_path) / "short.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"y" * 60_000)  # bigger than the file; the size is unknown to the entry
    assert download(entry, tmp_path).read_bytes() == shorter
    assert [g.status for g in server.gets("/w/short.pth")] == [416, 200]


def test_corrupt_content_raises_integrity_error_and_leaves_nothing(server, tmp_path):
    corrupt = bytearray(PAYLOAD)
    corrupt[12345] ^= 0xFF
    server.routes["/w/tiny_sam.pth"] = Route(bytes(corrupt))
    entry = entry_for(server.url("/w/tiny_sam.pth"))  # expects the real PAYLOAD's hash
    with pytest.raises(IntegrityError, match="SHA-256"):
        download(entry, tmp_path)
    folder = weights_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["tiny_sam.pth.lock"]


def test_wrong_size_is_refused_before_download(server, tmp_path):
    entry = served(server, Route(PAYLOAD[:-1000]))  # expects the full PAYLOAD size
    with pytest.raises(IntegrityError, match="bytes"):
        download(entry, tmp_path)
    assert not cache_path(entry, tmp_path).exists()
    assert not (weights_dir(tmp_path) / "tiny_sam.pth.part").exists()


def test_server_gone_gives_offline_instructions(tmp_path):
    url = unused_loopback_url("/w/tiny_sam.pth")
    entry = entry_for(url)
    with pytest.raises(WeightsUnavailableError) as info:
        download(entry, tmp_path, timeout=5)
    message = str(info.value)
    assert url in message and str(cache_path(entry, tmp_path)) in message
    assert "--sam-checkpoint" in message


def test_unusable_cache_folder_is_reported(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    home = tmp_path / "a_file"
    home.write_text("not a folder")
    with pytest.raises(WeightsUnavailableError, match="cannot create the cache folder"):
        download(entry, home)


def test_not_enough_disk_space_is_refused_before_writing(server, tmp_path):
    huge = 10**15  # 1 PB, announced by the server and expected by the entry
    server.routes["/w/huge.pth"] = Route(PAYLOAD, content_length=huge)
    entry = WeightsEntry(name="huge", family="dinov2", architecture="dinov2_tiny14", file_name="huge.pth",
                         url=server.url("/w/huge.pth"), size=huge)
    with pytest.raises(WeightsUnavailableError, match="not enough disk space"):
        download(entry, tmp_path)
    assert not (weights_dir(tmp_path) / "huge.pth.part").exists()
    assert "--dinov2-checkpoint" in str(pytest.raises(WeightsUnavailableError, download, entry, tmp_path).value)


def test_http_error_status_is_reported(server, tmp_path):
    entry = served(server, Route(status=404))
    with pytest.raises(WeightsUnavailableError, match="404"):
        download(entry, tmp_path)


def test_cancel_keeps_the_part_file_for_resume(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    cancel = threading.Event()

    def progress(done, total):
        if done >= 100_000:
            cancel.set()

    with pytest.raises(CancelledError):
        download(entry, tmp_path, progress=progress, cancel=cancel)
    part = weights_dir(tmp_path) / "tiny_sam.pth.part"
    kept = part.stat().st_size
    assert 100_000 <= kept < len(PAYLOAD)
    assert not cache_path(entry, tmp_path).exists()
    assert download(entry, tmp_path).read_bytes() == PAYLOAD
    assert server.gets("/w/tiny_sam.pth")[-1].range == f"bytes={kept}-"


def test_redirect_to_plain_http_is_refused(server, tmp_path):
    entry = served(server, Route(redirect_to="http://example.invalid/tiny_sam.pth"))
    with pytest.raises(WeightsUnavailableError, match="refused redirect"):
        download(entry, tmp_path)


def test_redirect_within_loopback_is_followed(server, tmp_path):
    server.routes["/real/tiny_sam.pth"] = Route(PAYLOAD)
    entry = served(server, Route(redirect_to=server.url("/real/tiny_sam.pth")))
    assert download(entry, tmp_path).read_bytes() == PAYLOAD


def test_insecure_mirror_is_refused(tmp_path):
    with pytest.raises(ValueError, match="refused"):
        download(REGISTRY["vit_b"], tmp_path, base_url="http://mirror.example.com/weights")


def test_two_concurrent_downloads_fetch_once(server, tmp_path):
    entry = served(server, Route(PAYLOAD, chunk_delay=0.01))
    results, errors = [], []

    def run():
        try:
            results.append(download(entry, tmp_path))
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == PAYLOAD
    assert len(server.gets("/w/tiny_sam.pth")) == 1


@pytest.mark.skipif(os.name == "nt", reason="the helper process locks with fcntl")
def test_lock_held_by_another_process_blocks_until_timeout_or_cancel(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    lock_file = weights_dir(tmp_path) / "tiny_sam.pth.lock"
    lock_file.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(lock_file)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WeightsUnavailableError, match="another process"):
            download(entry, tmp_path, lock_timeout=0.5)
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        with pytest.raises(CancelledError):
            download(entry, tmp_path, cancel=cancel)
        assert server.gets("/w/tiny_sam.pth") == []  # nothing fetched while another process holds the lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert download(entry, tmp_path, lock_timeout=5).read_bytes() == PAYLOAD  # released when the holder exits


# ----------------------------------------------------------------------------- resolution
def test_explicit_checkpoint_wins_and_must_exist(tmp_path):
    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"not checked")
    assert resolve_checkpoint("vit_h", ckpt, home=tmp_path) == ckpt
    assert resolve_checkpoint("sam_tiny", str(ckpt), home=tmp_path) == ckpt
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint("vit_h", tmp_path / "missing.pth", home=tmp_path)


@pytest.mark.parametrize("name,option", [("dinov2_tiny14", "--dinov2-checkpoint"), ("sam_tiny", "--sam-checkpoint")])
def test_test_only_names_need_an_explicit_path(tmp_path, name, option):
    with pytest.raises(CheckpointError, match=option):
        resolve_checkpoint(name, home=tmp_path)


def test_unknown_name_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="vit_b"):
        resolve_checkpoint("vit_xxl", home=tmp_path)


def test_offline_message_names_url_and_path(tmp_path):
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_checkpoint("dinov2_vitl14", download=False, home=tmp_path)
    message = str(info.value)
    assert REGISTRY["dinov2_vitl14"].url in message
    assert str(tmp_path / "weights" / "dinov2_vitl14_pretrain.pth") in message
    assert "--dinov2-checkpoint" in message


def test_cached_file_is_used_offline(tmp_path):
    with LocalHTTPServer({"/w/tiny_sam.pth": Route(PAYLOAD)}) as srv:
        entry = entry_for(srv.url("/w/tiny_sam.pth"))
        path = resolve_checkpoint(entry, home=tmp_path)
    # server gone: the cached, verified file is still resolved
    assert resolve_checkpoint(entry, home=tmp_path, download=False) == path
    assert resolve_checkpoint(entry.name, home=tmp_path, registry={entry.name: entry}) == path


def test_corrupt_cached_file_is_refused_offline_and_refetched_online(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    target = cache_path(entry, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(bytes(len(PAYLOAD)))  # right size, wrong content
    with pytest.raises(IntegrityError, match="SHA-256"):
        resolve_checkpoint(entry, home=tmp_path, download=False)
    assert target.exists()  # refusing does not delete the user's file
    assert resolve_checkpoint(entry, home=tmp_path).read_bytes() == PAYLOAD


def test_truncated_cached_file_is_detected_by_size(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    path = download(entry, tmp_path)
    with open(path, "r+b") as f:
        f.truncate(1000)
    assert cache_status(entry, tmp_path) == "wrong size"
    with pytest.raises(IntegrityError, match="1000 bytes"):
        resolve_checkpoint(entry, home=tmp_path, download=False)
    assert resolve_checkpoint(entry, home=tmp_path).read_bytes() == PAYLOAD


def test_verified_marker_is_keyed_by_size_and_mtime(server, tmp_path):
    entry = served(server, Route(PAYLOAD))
    path = download(entry, tmp_path)
    stat = path.stat()
    flipped = bytearray(PAYLOAD)
    flipped[0] ^= 1
    path.write_bytes(bytes(flipped))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verify_file(path, entry)  # same size and mtime: the recorded check is trusted (no rehash)
    with pytest.raises(IntegrityError):
        verify_file(path, entry, use_marker=False)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache_status(entry, tmp_path) == "present"
    with pytest.raises(IntegrityError):
        verify_file(path, entry)


def test_entry_without_hash_checks_size_only(server, tmp_path):
    server.routes["/w/nohash.pth"] = Route(PAYLOAD)
    entry = entry_for(server.url("/w/nohash.pth"), name="nohash", sha=False)
    assert download(entry, tmp_path).read_bytes() == PAYLOAD


# ----------------------------------------------------------------------------- command line
def run_cli(argv, registry=None):
    parser = argparse.ArgumentParser(prog="protosam")
    add_subcommands(parser.add_subparsers(dest="command"), registry=registry)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_shows_every_model(tmp_path, capsys):
    assert run_cli(["weights", "list", "--home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in REGISTRY:
        assert name in out
    assert "missing" in out and str(tmp_path / "weights" / "sam_vit_h_4b8939.pth") in out


def test_cli_download_and_path(server, tmp_path, capsys):
    entry = served(server, Route(PAYLOAD))
    registry = {entry.name: entry}
    assert run_cli(["weights", "path", entry.name, "--home", str(tmp_path)], registry) == 1
    err = capsys.readouterr().err
    assert entry.url in err and str(cache_path(entry, tmp_path)) in err
    assert run_cli(["weights", "download", entry.name, "--home", str(tmp_path)], registry) == 0
    captured = capsys.readouterr()
    assert str(cache_path(entry, tmp_path)) in captured.out
    assert "100 %" in captured.err  # progress on stderr
    assert run_cli(["weights", "path", entry.name, "--home", str(tmp_path)], registry) == 0
    assert capsys.readouterr().out.strip() == str(cache_path(entry, tmp_path))
    assert run_cli(["weights", "list", "--home", str(tmp_path)], registry) == 0
    assert "verified" in capsys.readouterr().out


def test_cli_download_failures_exit_1(server, tmp_path, capsys):
    server.routes["/mirror/sam_vit_b_01ec64.pth"] = Route(PAYLOAD)  # not the published file
    code = run_cli(["weights", "download", "vit_b", "sam_tiny", "--home", str(tmp_path),
                    "--base-url", server.url("/mirror")])
    assert code == 1
    err = capsys.readouterr().err
    assert "375042383 bytes" in err and "--sam-checkpoint" in err
    assert not (weights_dir(tmp_path) / "sam_vit_b_01ec64.pth").exists()


def test_cli_unknown_name(tmp_path, capsys):
    assert run_cli(["weights", "path", "nope", "--home", str(tmp_path)]) == 1
    assert "Unknown model" in capsys.readouterr().err


def test_python_dash_m_protosam_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "protosam", "weights", "path", "vit_b", "--home", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert REGISTRY["vit_b"].url in proc.stderr
