"""The memory-mapped store of decoded images: exact, resumable, shared, and self-healing."""
import errno
import os

import numpy as np
import pytest
from conftest import make_image

from transferlab import store as store_module
from transferlab.files import DiskFullError
from transferlab.images import Sample, load_image
from transferlab.store import StoreKey, open_store

SIDE = 40


@pytest.fixture
def samples(tmp_path):
    return [Sample(str(make_image(tmp_path / "img" / f"{i}.jpg", (20 * i % 255, 90, 9), i, (60 + i, 48))), "a")
            for i in range(12)]


def folder_of(samples, cache):
    return cache / StoreKey.of(samples, SIDE).folder_name


def test_returns_exactly_what_decoding_returns(tmp_path, samples):
    store = open_store(samples, SIDE, tmp_path / "cache", workers=1)
    assert len(store) == len(samples)
    for sample in samples:
        expected = np.asarray(load_image(sample.path, SIDE))
        assert np.array_equal(store.image(store.slot(sample), sample.path), expected)
    # Opened again, nothing is decoded: the same file, mapped.
    mtime = (store.folder / "pixels.bin").stat().st_mtime_ns
    again = open_store(samples, SIDE, tmp_path / "cache")
    assert (again.folder / "pixels.bin").stat().st_mtime_ns == mtime and isinstance(again.pixels, np.memmap)


def test_parallel_decode_matches_serial(tmp_path, samples):
    many = samples * 6  # the same 12 images under 72 rows: stored once each
    serial = open_store(samples, SIDE, tmp_path / "serial", workers=1)
    parallel = open_store(many, SIDE, tmp_path / "parallel", workers=2)
    assert len(parallel) == 12
    assert (serial.folder / "pixels.bin").read_bytes() == (parallel.folder / "pixels.bin").read_bytes()


def test_keyed_by_content_and_size_not_by_order(tmp_path, samples):
    cache = tmp_path / "cache"
    a = open_store(samples, SIDE, cache)
    b = open_store(list(reversed(samples)), SIDE, cache)
    assert a.folder == b.folder
    assert open_store(samples, SIDE + 8, cache).folder != a.folder
    make_image(tmp_path / "img" / "0.jpg", (255, 255, 255), 0, (60, 48))
    assert open_store(samples, SIDE, cache).folder != a.folder


def test_an_interrupted_decode_continues_where_it_stopped(tmp_path, samples, monkeypatch, capsys):
    decoded = store_module._decoded

    def interrupted_after_five(paths, min_side, workers, resample="bilinear"):
        for i, array in enumerate(decoded(paths, min_side, workers)):
            if i == 5:
                raise KeyboardInterrupt
            yield array
    monkeypatch.setattr(store_module, "_decoded", interrupted_after_five)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        open_store(samples, SIDE, cache)
    monkeypatch.setattr(store_module, "_decoded", decoded)
    seen = []
    monkeypatch.setattr(store_module, "_decoded", lambda paths, *a: (seen.append(len(paths)), decoded(paths, *a))[1])
    store = open_store(samples, SIDE, cache)
    assert seen == [len(samples) - 5]  # only the rest was decoded
    assert "continuing an interrupted decode after 5 of 12 images" in capsys.readouterr().out
    assert all(np.array_equal(store.image(store.slot(s), s.path), np.asarray(load_image(s.path, SIDE)))
               for s in samples)


def test_a_truncated_store_decodes_what_is_missing(tmp_path, samples, capfd):
    cache = tmp_path / "cache"
    folder = open_store(samples, SIDE, cache).folder
    pixels = folder / "pixels.bin"
    pixels.write_bytes(pixels.read_bytes()[:pixels.stat().st_size // 2])
    store = open_store(samples, SIDE, cache)
    assert "(truncated or damaged); decoding the missing images again" in capfd.readouterr().err
    assert all(np.array_equal(store.image(store.slot(s), s.path), np.asarray(load_image(s.path, SIDE)))
               for s in samples)


def test_an_unreadable_index_is_rebuilt(tmp_path, samples, capfd):
    cache = tmp_path / "cache"
    folder = open_store(samples, SIDE, cache).folder
    (folder / "index.npy").write_bytes(b"not numpy")
    store = open_store(samples, SIDE, cache)
    assert "index.npy: unreadable" in capfd.readouterr().err
    assert len(store) == len(samples)


def test_a_damaged_image_is_decoded_again_and_mended_in_place(tmp_path, samples, capfd):
    cache = tmp_path / "cache"
    store = open_store(samples, SIDE, cache)
    slot = store.slot(samples[3])
    offset = int(store.index[slot]["offset"])
    with open(store.folder / "pixels.bin", "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\xff\x00\xff")
    fresh = open_store(samples, SIDE, cache)  # same size: the damage shows only in the checksum
    image = fresh.image(slot, samples[3].path)
    assert np.array_equal(image, np.asarray(load_image(samples[3].path, SIDE)))
    assert f"image {slot} ({samples[3].path}) is damaged; decoded it again" in capfd.readouterr().err
    mended = open_store(samples, SIDE, cache)
    assert np.array_equal(mended.image(slot, samples[3].path), image)
    assert "damaged" not in capfd.readouterr().err


def test_temporary_files_of_dead_writers_are_removed_live_ones_kept(tmp_path, samples):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / ".index.npy.999999999.abc.tmp"
    alive = cache / f".index.npy.{os.getppid()}.abc.tmp"
    dead.write_bytes(b"x" * 100)
    alive.write_bytes(b"x")
    folder = folder_of(samples, cache)
    folder.mkdir()
    (folder / "pixels.bin").write_bytes(b"")  # an unfinished store: opening it builds under the lock
    open_store(samples, SIDE, cache)
    assert not dead.exists() and alive.exists()


def test_no_room_for_the_decoded_images_stops_before_decoding(tmp_path, samples, monkeypatch):
    monkeypatch.setattr(store_module, "free_bytes", lambda folder: 1000)
    with pytest.raises(DiskFullError, match=r"pixels.bin: no space left on .* \(about .* needed, 1.0 KB free\)"):
        open_store(samples, SIDE, tmp_path / "cache")


def test_a_write_failing_for_lack_of_space_says_so_and_keeps_what_was_committed(tmp_path, samples, monkeypatch):
    real_commit = store_module._commit
    calls = []

    def commit_then_fill_the_disk(folder, out, entries):
        real_commit(folder, out, entries)
        calls.append(len(entries))
        if len(calls) == 1:
            def full(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            out.write = full
    monkeypatch.setattr(store_module, "COMMIT_SECONDS", 0.0)
    monkeypatch.setattr(store_module, "_commit", commit_then_fill_the_disk)
    words = "no space left on .*the images decoded so far are kept.*TRANSFERLAB_CACHE_DIR"
    with pytest.raises(DiskFullError, match=words):
        open_store(samples, SIDE, tmp_path / "cache", workers=1)
    monkeypatch.setattr(store_module, "_commit", real_commit)
    store = open_store(samples, SIDE, tmp_path / "cache", workers=1)  # space freed: it continues
    assert len(store) == len(samples)


def damage(store, slot):
    with open(store.folder / "pixels.bin", "r+b") as f:
        f.seek(int(store.index[slot]["offset"]) + 10)
        f.write(b"\xff\x00\xff")


def test_an_image_that_decodes_differently_now_is_never_trusted(tmp_path, samples, monkeypatch, capfd):
    """A new Pillow may decode a file to other bytes: the re-decode is used, never the stored bytes."""
    store = open_store(samples, SIDE, tmp_path / "cache")
    slot = store.slot(samples[2])
    damage(store, slot)
    fresh = open_store(samples, SIDE, tmp_path / "cache")
    other_decoder = np.asarray(load_image(samples[2].path, SIDE)) // 2  # what "another decoder" returns
    monkeypatch.setattr(store_module, "load_image", lambda path, side, resample="bilinear": other_decoder)
    for _ in range(3):
        assert np.array_equal(fresh.image(slot, samples[2].path), other_decoder)
    err = capfd.readouterr().err
    assert err.count("is damaged") == 1 and err.count("decodes to other bytes") == 1


def test_the_decoder_version_is_part_of_the_store_key(samples, monkeypatch):
    before = StoreKey.of(samples, SIDE).folder_name
    monkeypatch.setattr(store_module.PIL, "__version__", "0.0-another")
    assert StoreKey.of(samples, SIDE).folder_name != before


def test_images_kept_on_the_device_are_checked_and_mended_too(tmp_path, samples):
    import torch

    from transferlab.data import DeviceImages

    store = open_store(samples, SIDE, tmp_path / "cache")
    slot = store.slot(samples[5])
    damage(store, slot)
    images = DeviceImages(open_store(samples, SIDE, tmp_path / "cache"), torch.device("cpu"))
    images.resident, images.flat = True, images.flat.clone()  # as if uploaded whole to a GPU
    expected = torch.from_numpy(np.array(load_image(samples[5].path, SIDE))).permute(2, 0, 1)
    assert torch.equal(images.image(slot, samples[5].path), expected)
    assert torch.equal(images.image(slot, samples[5].path), expected)  # the upload itself was mended


def test_a_damaged_index_is_reported_once(tmp_path, samples, capfd):
    folder = open_store(samples, SIDE, tmp_path / "cache").folder
    (folder / "index.npy").write_bytes(b"not numpy")
    open_store(samples, SIDE, tmp_path / "cache")
    assert capfd.readouterr().err.count("unreadable") == 1
