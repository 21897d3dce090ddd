"""Mirrors (models/mirror.py): manifests a mirror serves, hostile ones refused naming the mirror."""

from __future__ import annotations

import gzip
import json
import re

import pytest
from test_models_pull import MB, blob, events, index, make_manifest, srv, store  # noqa: F401  (fixtures)

from pipx_llama.fetch.http import FetchOptions
from pipx_llama.models.manifest import Manifest, ManifestError, load_catalog, parse_manifest
from pipx_llama.models.mirror import MirrorError, manifest_from_mirrors
from pipx_llama.models.pull import PullError, pull
from pipx_llama.models.sources import PullOptions

# --- hostile mirrors: index.json and the manifests it lists -------------------------------------------------


def _mirror_text(m: Manifest, file: str | None = None, **entry) -> bytes:
    item = {
        "name": m.name,
        "aliases": list(m.aliases),
        "file": file or f"{m.name}.toml",
        "sha256": m.text_sha256,
    }
    return json.dumps({"format": 1, "manifests": [{**item, **entry}]}).encode()


@pytest.mark.parametrize(
    "body,expect",
    [
        (b"[]", "must be a JSON object, not a list"),
        (b"null", "must be a JSON object, not null"),
        (b'"x"', "must be a JSON object, not a string"),
        (b'{"manifests": {}}', "'manifests' must be a list, not an object"),
        (b'{"manifests": null}', "'manifests' must be a list, not null"),
        (b'{"manifests": [1]}', r"manifests\[0\] must be an object, not a number"),
        (b'{"manifests": [null]}', r"manifests\[0\] must be an object, not null"),
        (
            b'{"manifests": [{"name": null, "file": "x.toml"}]}',
            r"manifests\[0\]\.name must be a non-empty string",
        ),
        (
            b'{"manifests": [{"name": 7, "file": "x.toml"}]}',
            r"manifests\[0\]\.name must be a non-empty string, not 7",
        ),
        (
            b'{"manifests": [{"name": "x", "aliases": "y", "file": "x.toml"}]}',
            r"aliases must be a list of strings",
        ),
        (
            b'{"manifests": [{"name": "x", "aliases": [null], "file": "x.toml"}]}',
            r"aliases must be a list of strings",
        ),
        (b'{"manifests": [{"name": "x"}]}', r"manifests\[0\]\.file null: must be a non-empty string"),
        (
            b'{"manifests": [{"name": "x", "file": {"a": 1}}]}',
            r"\.file an object: must be a non-empty string",
        ),
        (
            b'{"manifests": [{"name": "x", "file": "../../etc/passwd"}]}',
            r"\.file \"\.\./\.\./etc/passwd\": '\.\.'",
        ),
        (b'{"manifests": [{"name": "x", "file": "/etc/passwd"}]}', r"absolute paths"),
        (b'{"manifests": [{"name": "x", "file": "x.toml", "sha256": 5}]}', r"\.sha256 5 is not 64 lowercase"),
        (b'{"format": 2, "manifests": []}', r"has format 2; this pipx-llama reads format 1"),
        (b"[" * 100_000 + b"]" * 100_000, r"is not valid JSON: nested too deeply"),
        (b'{"manifests": [{"name": "caf\xe9"}]}', r"is not UTF-8 text \(byte 28\)"),
        (b"\xff\xfe{\x00}\x00", r"is not UTF-8 text"),
        (b'{"manifests": [', r"is not valid JSON: Expecting value"),
        (b'{"n": 1' + b"0" * 5000 + b"}", r"is not valid JSON: Exceeds the limit"),
    ],
)
def test_a_malformed_mirror_index_is_one_line_naming_the_mirror(tmp_path, srv, body, expect):
    srv.put("/m/manifests/index.json", body)
    folder = tmp_path / "mirror"
    (folder / "manifests").mkdir(parents=True)
    (folder / "manifests" / "index.json").write_bytes(body)
    for base, shown in ((srv.url("/m/"), srv.url("/m/")), (str(folder), str(folder))):
        with pytest.raises(MirrorError) as exc:
            manifest_from_mirrors("x", [base])
        msg = exc.value.message
        assert msg.startswith(f"mirror {shown}: manifests/index.json ") and "\n" not in msg, msg
        assert re.search(expect, msg), msg
        assert "unexpected" not in msg.lower() and len(msg) < 300


def test_the_manifests_a_mirror_lists_must_exist_be_files_and_match(tmp_path, srv):
    m = make_manifest({"m.gguf": blob(10, 40)}, [], name="labmodel")
    srv.put("/m/manifests/index.json", _mirror_text(m))
    with pytest.raises(
        MirrorError, match=r"lists manifests/labmodel\.toml for 'labmodel', but the file is missing"
    ):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    # a folder mirror whose manifest file is a directory
    folder = tmp_path / "mirror"
    (folder / "manifests" / "labmodel.toml").mkdir(parents=True)
    (folder / "manifests" / "index.json").write_bytes(_mirror_text(m))
    with pytest.raises(MirrorError, match=r"cannot read manifests/labmodel\.toml: (Is a directory|.*denied)"):
        manifest_from_mirrors("labmodel", [str(folder)])
    # a file that is not the one the index vouches for (a torn update, or tampering)
    srv.put("/m/manifests/labmodel.toml", m.text.replace("test", "tset").encode())
    with pytest.raises(MirrorError, match="does not have the sha256 its index gives"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    srv.put("/m/manifests/labmodel.toml", b"\xff" + m.text.encode())
    srv.put("/m/manifests/index.json", _mirror_text(m, sha256=None))
    with pytest.raises(MirrorError, match=r"labmodel\.toml is not UTF-8 text \(byte 0\)"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    srv.put("/m/manifests/labmodel.toml", b"a = " + b"[" * 100_000)
    with pytest.raises(
        ManifestError, match=r"manifests/labmodel\.toml: not valid TOML: .* nested too deeply"
    ):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    # bounded: a manifest larger than any real one is not read to the end (with or without a length)
    srv.put("/m/manifests/labmodel.toml", b"#" * (2 << 20))
    for chunked in (False, True):
        srv.faults("/m/manifests/labmodel.toml").chunked = chunked
        srv.reset_counters()
        with pytest.raises(MirrorError, match=r"labmodel\.toml is larger than 1048576 bytes"):
            manifest_from_mirrors("labmodel", [srv.url("/m")])
    srv.put("/m/manifests/index.json", b" " * (9 << 20))
    with pytest.raises(MirrorError, match=r"index\.json is larger than 8388608 bytes"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])


def test_a_mirror_manifest_must_be_the_model_asked_for_and_never_replace_a_known_one(srv):
    evil = make_manifest({"m.gguf": blob(10, 41)}, [], name="evil")
    srv.put("/m/manifests/index.json", _mirror_text(evil, name="labmodel", aliases=[]))
    srv.put("/m/manifests/evil.toml", evil.text.encode())
    with pytest.raises(MirrorError, match=r"evil\.toml, listed for 'labmodel', is the manifest of 'evil'"):
        manifest_from_mirrors("labmodel", [srv.url("/m")])
    # an alias of the manifest is the name asked for: accepted (as the local catalog resolves aliases)
    lab = parse_manifest(make_manifest({"m.gguf": blob(10, 41)}, [], name="lab-model-7b").text.replace(
        'name = "lab-model-7b"', 'name = "lab-model-7b"\naliases = ["LAB", "smollm2"]'), "lab.toml")
    srv.put("/m/manifests/index.json", _mirror_text(lab, file="lab.toml"))
    srv.put("/m/manifests/lab.toml", lab.text.encode())
    assert manifest_from_mirrors("lab", [srv.url("/m")]).name == "lab-model-7b"
    # ...but it may not take a name or alias the local catalog already has
    with pytest.raises(
        MirrorError, match=r"names 'smollm2', which is already the model 'smollm2-135m-instruct'"
    ):
        manifest_from_mirrors("lab", [srv.url("/m")], catalog=load_catalog())


def test_a_mirror_manifest_with_a_hostile_pip_requirement_is_refused(srv):
    data = blob(10, 42)
    good = make_manifest(
        {"m.gguf": data},
        [
            {
                "type": "pip",
                "requirement": "evilpkg==1.0",
                "wheel_sha256": "1" * 64,
                "members": {"m.gguf": "evilpkg/m.gguf"},
            }
        ],
        name="labmodel",
    )
    for req in (
        "evilpkg @ http://example.invalid/evilpkg-1.0.tar.gz",
        "-rhttp://example.invalid/r.txt",
        "--requirement=http://example.invalid/r.txt",
        "evilpkg[x]==1.0",
        "evilpkg==1.0; os_name=='posix'",
    ):
        text = good.text.replace('"evilpkg==1.0"', json.dumps(req))
        srv.put("/m/manifests/labmodel.toml", text.encode())
        srv.put("/m/manifests/index.json", _mirror_text(good, sha256=None))
        with pytest.raises(ManifestError) as exc:
            manifest_from_mirrors("labmodel", [srv.url("/m/")])
        assert exc.value.message.startswith(f"invalid manifest {srv.url('/m/manifests/labmodel.toml')}: ")
        assert "requirement" in exc.value.message and "is not name==version" in exc.value.message


def test_a_compressed_mirror_document_is_refused_not_inflated(srv):
    """A gzip body the client did not ask for (it asks for identity) could expand without bound."""
    bomb = gzip.compress(b" " * (64 << 20), compresslevel=9)  # 64 MB of JSON whitespace in ~64 KB
    srv.put("/m/manifests/index.json", bomb, headers={"Content-Encoding": "gzip"})
    with pytest.raises(MirrorError, match="Content-Encoding 'gzip' although identity was asked for"):
        manifest_from_mirrors("x", [srv.url("/m")])
    assert srv.requests[-1][2].get("Accept-Encoding") == "identity"
    assert srv.bytes_sent <= len(bomb)


def test_an_unreachable_mirror_or_one_without_an_index_is_passed_over(tmp_path, srv):
    assert (
        manifest_from_mirrors("x", [srv.url("/none/"), str(tmp_path / "nothing"), "http://127.0.0.1:9/"])
        is None
    )


def test_hints_say_another_source_is_tried_only_when_there_is_one(srv, store):
    data = blob(50_000, 40)
    srv.put("/a/m.gguf", data[:40_000])   # the wrong size
    srv.put("/b/m.gguf", data[:40_000])
    m = make_manifest({"m.gguf": data}, [{"type": "url", "base": srv.url("/a/")},
                                         {"type": "url", "base": srv.url("/b/")}])
    evs: list = []
    with pytest.raises(PullError) as err:
        pull(store, m, PullOptions(fetch=FetchOptions(backoff_base=0.01)), events(evs))
    failed = [e.message for e in evs if e.kind == "source-failed"]
    assert failed[0].endswith("trying the next source") and not failed[1].endswith("trying the next source")
    assert "will be tried" not in err.value.hint and "resume" not in err.value.hint
