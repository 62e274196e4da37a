"""Building blocks for the calibration and evaluation inputs: photo sets, crops, text, speech.

The split rule of the whole zoo: a source file (photo, sentence) feeds either a model's
calibration or its evaluation, never both. The photo sets below are fixed lists, the crops and
renderings come from fixed boxes or from ``numpy.random.default_rng(seed)`` with fixed seeds,
so rebuilding gives the same files. :func:`check_disjoint` verifies the rule by content.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import wave
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import cv2
import numpy as np

from .fetch import ESPEAK_ROOT
from .paths import DATA, MATERIAL, PHOTOS, SAMPLE_PHOTOS

Box = Tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

# ----------------------------------------------------------------------------------------------
# photo sets

PEOPLE = PHOTOS / "people"
TEXT = PHOTOS / "text"
#: group photos whose faces/people calibrate the people models (YOLOv8n, O-net, BlazeFace)
PEOPLE_CALIB = tuple(PEOPLE / f"faceapi_sample{i}.jpg" for i in (1, 2, 3))
#: people photos kept for evaluation
PEOPLE_EVAL = tuple([PEOPLE / f"faceapi_sample{i}.jpg" for i in (4, 5, 6)]
                    + [PEOPLE / "ultralytics_bus.jpg", PEOPLE / "ultralytics_zidane.jpg"])
#: text photos that calibrate the OCR models (documents, word crops, a sudoku)
TEXT_CALIB = tuple(TEXT / f"opencv_{n}" for n in (
    "imageTextN.png", "text_defocus.jpg", "sudoku.png", "scenetext_word01.jpg",
    "scenetext_word02.jpg", "scenetext_word03.jpg", "scenetext_word04.jpg"))
#: scene-text and document photos kept for evaluating the OCR models
TEXT_EVAL = tuple(TEXT / f"opencv_{n}" for n in (
    [f"scenetext0{i}.jpg" for i in range(1, 7)]
    + [f"scenetext_segmented_word0{i}.jpg" for i in range(1, 6)]
    + ["imageTextR.png", "text_motion.jpg"]))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def general_photos() -> List[Path]:
    """The general photos: ``samples/material/calib`` plus Debian darknet's, deduplicated by
    content (samples/ already holds six of darknet's), sorted by name."""
    seen: Dict[str, Path] = {}
    candidates = sorted(p for p in SAMPLE_PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    candidates += sorted((PHOTOS / "darknet").glob("*.jpg"))
    for path in candidates:
        seen.setdefault(sha256_file(path), path)
    return sorted(seen.values(), key=lambda p: p.name)


def check_disjoint(calib: Iterable[Path], evaluation: Iterable[Path], what: str) -> None:
    """Raise when a calibration and an evaluation source file have the same content."""
    calib_hashes = {sha256_file(p): p for p in calib}
    common = [(calib_hashes[h].name, p.name) for p in evaluation if (h := sha256_file(p)) in calib_hashes]
    if common:
        raise RuntimeError(f"{what}: calibration and evaluation share source files {common}")


# ----------------------------------------------------------------------------------------------
# images and crops


def read_bgr(path: Path) -> np.ndarray:
    image = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RuntimeError(f"cannot read {path}")
    return image


def save_png(path: Path, image: np.ndarray) -> Path:
    """Write a BGR image losslessly (crops are never recompressed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    path.write_bytes(data.tobytes())
    return path


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """Pixels of ``box`` (rounded), zero where the box leaves the image (as MTCNN pads)."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    out = np.zeros((max(1, y2 - y1), max(1, x2 - x1), image.shape[2]), image.dtype)
    sx1, sy1 = max(0, x1), max(0, y1)
    sx2, sy2 = min(image.shape[1], x2), min(image.shape[0], y2)
    if sx2 > sx1 and sy2 > sy1:
        out[sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = image[sy1:sy2, sx1:sx2]
    return out


def fraction_box(image: np.ndarray, fractions: Tuple[float, float, float, float]) -> Box:
    """A box given as fractions (x1, y1, x2, y2) of the image size."""
    h, w = image.shape[:2]
    return fractions[0] * w, fractions[1] * h, fractions[2] * w, fractions[3] * h


FULL = (0.0, 0.0, 1.0, 1.0)


def write_views(photos: Sequence[Path], views: Sequence[Tuple[float, float, float, float]],
                folder: Path) -> List[Path]:
    """Each photo seen through each fractional view; the full view is the photo itself,
    the others are saved as PNG crops in ``folder``. Returns the paths in photo-major order."""
    out: List[Path] = []
    for photo in photos:
        image = None
        for index, view in enumerate(views):
            if tuple(view) == FULL:
                out.append(photo)
                continue
            image = read_bgr(photo) if image is None else image
            out.append(save_png(folder / f"{photo.stem}_view{index}.png", crop(image, fraction_box(image, view))))
    return out


def square(box: Box, scale: float = 1.0, shift: Tuple[float, float] = (0.0, 0.0)) -> Box:
    """A square of side ``scale * max(w, h)`` around the box centre, moved by ``shift`` sides."""
    x1, y1, x2, y2 = box
    side = max(x2 - x1, y2 - y1) * scale
    cx = (x1 + x2) / 2 + shift[0] * side
    cy = (y1 + y2) / 2 + shift[1] * side
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def inside(box: Box, image: np.ndarray) -> Box:
    """Move (and if needed shrink) a square box so that it lies inside the image."""
    h, w = image.shape[:2]
    side = min(box[2] - box[0], w, h)
    x1 = min(max(box[0], 0), w - side)
    y1 = min(max(box[1], 0), h - side)
    return x1, y1, x1 + side, y1 + side


def overlap(box: Box, others: Sequence[Box]) -> float:
    """Largest share of ``box``'s area covered by one of ``others``."""
    best = 0.0
    area = max((box[2] - box[0]) * (box[3] - box[1]), 1e-9)
    for o in others:
        iw = max(0.0, min(box[2], o[2]) - max(box[0], o[0]))
        ih = max(0.0, min(box[3], o[3]) - max(box[1], o[1]))
        best = max(best, iw * ih / area)
    return best


def random_squares(image: np.ndarray, count: int, rng: np.random.Generator,
                   avoid: Sequence[Box] = (), sizes: Tuple[float, float] = (0.08, 0.4),
                   max_overlap: float = 0.05) -> List[Box]:
    """Up to ``count`` random squares (side a fraction of the short side) that cover none of
    ``avoid`` by more than ``max_overlap`` of their area (nor it theirs)."""
    h, w = image.shape[:2]
    boxes: List[Box] = []
    for _ in range(count * 50):
        if len(boxes) == count:
            break
        side = rng.uniform(*sizes) * min(h, w)
        x1, y1 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        box = (x1, y1, x1 + side, y1 + side)
        if overlap(box, avoid) <= max_overlap and all(overlap(a, [box]) <= max_overlap for a in avoid):
            boxes.append(box)
    return boxes


# ----------------------------------------------------------------------------------------------
# rendered text

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansCondensed-Bold.ttf", "DejaVuSans-Oblique.ttf")

#: phrases rendered for calibration / for evaluation (disjoint)
CALIB_WORDS = (
    "OPEN", "Station 42", "Coffee", "EXIT", "Parking", "2024-05-17", "Main Street", "SALE 50%",
    "Hotel", "Bakery", "No Entry", "Platform 3", "Welcome", "Pharmacy", "Bus Stop", "Taxi",
    "Library", "Museum", "Tickets", "Toilets", "Speed 30", "Garden", "Books", "Fresh Fruit",
    "Room 204", "Police", "Market", "Cinema", "North", "Bridge", "Pizza", "Office", "Bank",
    "Airport", "Hospital", "Lane 7", "Stop", "Push", "Pull", "Free WiFi", "Menu", "Closed")
EVAL_WORDS = (
    "Kitchen", "Gallery", "Sunday", "Route 66", "SCHOOL", "Harbour", "Fire Exit", "Ice Cream",
    "Theatre", "Post Office", "Bicycle", "Level 2", "Danger", "Quiet Zone", "Gate B12",
    "Flowers", "Repairs", "Station Road", "Bakery 24h", "Mountain", "Apartments", "River",
    "Tea Room", "Parking 7", "Tuesday", "Sports Hall", "Sale", "Yellow", "Garage", "Chapel",
    "Entrance", "Lift", "Pool", "Park Lane", "Dentist", "Hair Salon", "Tram 9", "Info")


def render_text(image: np.ndarray, text: str, rng: np.random.Generator,
                height_range: Tuple[int, int] = (22, 56)) -> Tuple[np.ndarray, Box]:
    """Draw ``text`` once on a copy of a BGR image with a DejaVu font (random font, size,
    position, contrasting colour); returns the image and the text's box."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    size = int(rng.integers(*height_range))
    font = ImageFont.truetype(str(FONT_DIR / FONTS[int(rng.integers(len(FONTS)))]), size)
    pil = Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    draw = ImageDraw.Draw(pil)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    if tw >= w - 4 or th >= h - 4:
        scale = min((w - 8) / max(tw, 1), (h - 8) / max(th, 1))
        font = ImageFont.truetype(font.path, max(8, int(size * scale)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
    x = int(rng.integers(2, max(3, w - tw - 2)))
    y = int(rng.integers(2, max(3, h - th - 2)))
    patch = np.asarray(pil)[y:y + th, x:x + tw]
    light = float(patch.mean()) > 127 if patch.size else True
    base = np.array([20, 20, 20]) if light else np.array([240, 240, 240])
    colour = tuple(int(c) for c in np.clip(base + rng.integers(-15, 16, 3), 0, 255))
    draw.text((x - left, y - top), text, font=font, fill=colour)
    return cv2.cvtColor(np.asarray(pil), cv2.COLOR_RGB2BGR), (x, y, x + tw, y + th)


# ----------------------------------------------------------------------------------------------
# speech


def espeak_paths() -> Tuple[Path, Path, Dict[str, str]]:
    """(binary, data folder, environment) of the extracted espeak-ng."""
    root = MATERIAL / ESPEAK_ROOT
    binary = root / "usr" / "bin" / "espeak-ng"
    data = next((root / "usr" / "lib").glob("*/espeak-ng-data")).parent
    libs = [str(data), str(data / "pulseaudio")]
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(libs + [os.environ.get("LD_LIBRARY_PATH", "")]))
    return binary, data, env


def read_wav(path: Path) -> Tuple[np.ndarray, int]:
    """Mono 16-bit wav -> (float32 samples in [-1, 1], sample rate)."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise RuntimeError(f"{path}: expected mono 16-bit PCM")
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return data.astype(np.float32) / 32768.0, w.getframerate()


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def espeak(text: str, voice: str, speed: int, pitch: int, out_wav: Path) -> Tuple[np.ndarray, int]:
    """Synthesize one sentence with the extracted espeak-ng (22050 Hz mono)."""
    binary, data, env = espeak_paths()
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary), f"--path={data}", "-v", voice, "-s", str(speed), "-p", str(pitch),
           "-w", str(out_wav), text]
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0 or not out_wav.is_file():
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): {res.stdout.strip()}")
    return read_wav(out_wav)


def resample(samples: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by zero-padding/truncating the spectrum (what
    ``scipy.signal.resample`` does), numpy only; the ends are silent, so periodicity is harmless."""
    if src == dst:
        return samples.astype(np.float32)
    n_out = int(round(len(samples) * dst / src))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = n_out // 2 + 1
    out = np.zeros(keep, np.complex128)
    out[:min(keep, len(spectrum))] = spectrum[:keep]
    return (np.fft.irfft(out, n_out) * (n_out / len(samples))).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# idempotent builds


class Stamp:
    """``data/<key>/stamp.json``: the recipe a model's material was built with.

    A build is skipped when the stamp holds the same recipe and every file it lists exists.
    """

    def __init__(self, key: str, recipe: Dict):
        self.path = DATA / key / "stamp.json"
        self.recipe = recipe

    def valid(self) -> bool:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return data.get("recipe") == self.recipe and all((DATA / f).is_file() for f in data.get("files", []))

    def write(self, files: Iterable[Path]) -> None:
        rels = sorted(os.path.relpath(Path(f).resolve(), DATA.resolve()) for f in files)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"recipe": self.recipe, "files": rels}, indent=1) + "\n")


def build_once(key: str, recipe: Dict, build: Callable[[], Iterable[Path]]) -> bool:
    """Run ``build`` (which returns the files it wrote) unless the stamp is valid; True if built."""
    stamp = Stamp(key, recipe)
    if stamp.valid():
        return False
    files = list(build())
    stamp.write(files)
    return True


def clean_folder(folder: Path, pattern: str = "*") -> None:
    """Delete the generated files of a folder before a rebuild (never anything else)."""
    if folder.is_dir():
        for p in folder.rglob(pattern):
            if p.is_file():
                p.unlink()


