"""SampleSource: what every backend reads. Encoded image bytes (from disk, or from RAM
when preloaded), the image's displayed size (EXIF-aware, read from the header only) and
its polygons. It is picklable, so DataLoader workers and DALI's parallel external source
can carry it to other processes.

Preloading (``preload_images`` / ``cache_images``) happens once, in the main process,
before any worker starts. The bytes of the whole split go into ONE buffer backed by a
file in ``/dev/shm`` (RAM) that every process maps instead of copying: forked DataLoader
workers inherit the mapping, and spawned processes (DALI's parallel external source)
unpickle a path and map the same pages. So there is one copy of the images per machine,
never one per worker. Without a usable ``/dev/shm`` the buffer is a plain array of the
main process (forked workers still share it copy-on-write; spawned ones get a copy).

``preload_decoded`` (CPU backend) keeps decoded RGB arrays instead, decoded at the JPEG
DCT reduction the split's geometry allows (see :meth:`SampleSource.preload_decoded`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ocr.data.annotations import AnnotationError, Problem, Sample
from ocr.shm import SHM_DIR, remove_stale_files

log = logging.getLogger(__name__)

# EXIF orientations 5..8 swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
_SHM_PREFIX = "dbnet_images_"


#: default ``data.max_image_pixels``: a 12000 x 8000 (A3 at 600 dpi) scan still loads. PIL itself refuses
#: files above 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (~179 M pixels) as decompression bombs.
DEFAULT_MAX_PIXELS = 100_000_000
#: how far (in bytes) from a file's end its end marker must lie (JPEG EOI, PNG IEND); trailers after it are allowed
_TAIL_BYTES = 4096
_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageReadError(RuntimeError):
    """An image that cannot be used; ``reason`` is a short stable key (``unreadable_image``,
    ``truncated_image``, ``image_too_large``, ``missing_image_file``), the message names the file."""

    def __init__(self, message: str, reason: str = "unreadable_image"):
        super().__init__(message)
        self.reason = reason


def read_image_size(path: Path) -> tuple[int, int]:
    """(height, width) as displayed, i.e. after EXIF orientation, from the header only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit is ours
            with Image.open(path) as im:
                width, height = im.size
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except FileNotFoundError as exc:
        raise ImageReadError(f"{path}: image file not found", "missing_image_file") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{path}: image too large for PIL to open ({exc})", "image_too_large") from exc
    except Exception as exc:  # PIL raises many types for broken files
        raise ImageReadError(f"{path}: cannot read image header ({exc})") from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def _tail(path: Path) -> tuple[bytes, bytes]:
    """(first 8 bytes, last ``_TAIL_BYTES`` bytes) of the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _TAIL_BYTES))
        return head, f.read()


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) as displayed, after the checks that cost no decode: the header
    parses, the pixel count is within ``max_pixels``, and a JPEG / PNG ends with its end
    marker (a truncated file does not). Raises :class:`ImageReadError` naming the file.
    What only a decode finds (corrupt entropy-coded data) is caught when the image is
    decoded (``ValidatedOCRDataset``, ``DaliLoader``)."""
    height, width = read_image_size(path)
    if max_pixels and height * width > max_pixels:
        raise ImageReadError(f"{path}: image is {width} x {height} = {height * width / 1e6:.1f} M pixels, above the "
                             f"limit of {max_pixels / 1e6:.1f} M (data.max_image_pixels)", "image_too_large")
    head, tail = _tail(path)
    if (head.startswith(_JPEG_MAGIC) and b"\xff\xd9" not in tail) or (head == _PNG_MAGIC and b"IEND" not in tail):
        raise ImageReadError(f"{path}: image file is truncated (no end-of-image marker)", "truncated_image")
    return height, width


def _outside_point(polygon: np.ndarray, height: int, width: int) -> int | None:
    """Index of the first point further outside the image than 10% of its side (None if none)."""
    mx, my = max(4.0, 0.1 * width), max(4.0, 0.1 * height)
    x, y = polygon[:, 0], polygon[:, 1]
    far = (x < -mx) | (x > width + mx) | (y < -my) | (y > height + my)
    hits = np.flatnonzero(far)
    return int(hits[0]) if hits.size else None


class SharedBytes:
    """Many byte strings in one read-only buffer. ``shared=True`` puts the buffer in a
    file under /dev/shm that is mapped (not copied) by every process that unpickles this
    object; the creating process removes the file when the object is garbage collected
    or the process exits (mappings stay valid after that)."""

    def __init__(self, chunks: list[bytes], shared: bool = True):
        lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.path: str | None = None
        self._array: np.ndarray | None = None
        total = int(self.offsets[-1])
        if shared and total > 0 and self._shm_usable(total):
            remove_stale_files(SHM_DIR, _SHM_PREFIX)
            fd, path = tempfile.mkstemp(prefix=f"{_SHM_PREFIX}{os.getpid()}_", suffix=".bin", dir=SHM_DIR)
            try:
                with os.fdopen(fd, "wb") as f:
                    for c in chunks:
                        f.write(c)
                self.path = path
                # only the creating process removes it (forked workers inherit this finalizer)
                self._finalizer = weakref.finalize(self, _unlink_if_owner, path, os.getpid())
            except OSError as exc:  # e.g. /dev/shm full: keep a private buffer instead
                _unlink_quietly(path)
                log.warning("cannot place preloaded images in %s (%s): keeping them in the main process", SHM_DIR, exc)
        if self.path is None:
            array = np.empty(total, dtype=np.uint8)
            for c, start in zip(chunks, self.offsets[:-1]):
                array[start:start + len(c)] = np.frombuffer(c, dtype=np.uint8)
            self._array = array

    @staticmethod
    def _shm_usable(total: int) -> bool:
        try:
            import shutil

            return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) and shutil.disk_usage(SHM_DIR).free > 2 * total
        except OSError:
            return False

    @property
    def shared(self) -> bool:
        return self.path is not None

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.nbytes,))
        return self._array

    def view(self, index: int) -> np.ndarray:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return np.frombuffer(self.array, dtype=np.uint8, count=end - start, offset=start)

    def __getitem__(self, index: int) -> bytes:
        return self.view(index).tobytes()

    def __getstate__(self) -> dict:
        if self.path is None:
            return {"path": None, "offsets": self.offsets, "_array": self._array}
        return {"path": self.path, "offsets": self.offsets, "_array": None}

    def __setstate__(self, state: dict) -> None:
        self.path, self.offsets, self._array = state["path"], state["offsets"], state["_array"]


def _unlink_if_owner(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        _unlink_quietly(path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class SampleSource:
    """Indexable view of one split: bytes, size and labels per sample."""

    def __init__(self, samples: list[Sample], preload: bool = False, split: str = "", on_error: str = "raise",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        """Every image is checked (:func:`check_image`) and every polygon must lie within
        the image (10% margin). ``on_error="raise"``: the first problem raises
        (:class:`ImageReadError` / ``AnnotationError``) naming the file. ``"skip"``: the image
        (or word) is dropped, kept in ``problems`` and listed in one warning; an image that
        fails to decode later is replaced in its batch (:meth:`usable_index`) and counted in
        ``failures``."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.split = split
        self.on_error = on_error
        self.problems: list[Problem] = []
        self.failures: dict[int, str] = {}  # index -> message: images that failed to decode mid-run
        self.samples, self.sizes = self._checked(list(samples), max_pixels)
        if self.problems:
            log.warning("%s split: skipped %d image(s) and %d word(s) (on_error=skip):\n%s", split or "?",
                        sum(p.level == "image" for p in self.problems), sum(p.level == "word" for p in self.problems),
                        "\n".join(f"  - {p.message}" for p in self.problems))
        if samples and not self.samples:
            raise ImageReadError(f"{split or '?'} split: none of its {len(samples)} images is usable (see the warning "
                                 f"above)")
        self._bytes: SharedBytes | None = None
        self._decoded: list[np.ndarray] | None = None
        self._decoded_reduction: list[int] | None = None
        if preload:
            self.preload()

    def _checked(self, samples: list[Sample], max_pixels: int) -> tuple[list[Sample], list[tuple[int, int]]]:
        kept, sizes = [], []
        for sample in samples:
            try:
                size = check_image(sample.path, max_pixels)
            except ImageReadError as exc:
                if self.on_error == "raise":
                    raise
                self.problems.append(Problem(exc.reason, str(exc), "image", sample.name))
                continue
            kept.append(self._inside(sample, *size))
            sizes.append(size)
        return kept, sizes

    def _inside(self, sample: Sample, height: int, width: int) -> Sample:
        """``sample`` without the words that lie far outside the image."""
        keep = []
        for k, (wid, polygon) in enumerate(zip(sample.word_ids, sample.polygons)):
            point = _outside_point(polygon, height, width)
            if point is None:
                keep.append(k)
                continue
            x, y = (float(v) for v in polygon[point])
            message = (f"{sample.path}: word {wid!r}: point {point} ({x:g}, {y:g}) lies far outside the "
                       f"{width} x {height} image")
            if self.on_error == "raise":
                raise AnnotationError(message)
            self.problems.append(Problem("point_outside_image", message, "word", sample.name, wid))
        if len(keep) == sample.num_words:
            return sample
        return replace(sample, polygons=tuple(sample.polygons[k] for k in keep),
                       ignore=tuple(sample.ignore[k] for k in keep), word_ids=tuple(sample.word_ids[k] for k in keep),
                       transcriptions=tuple(sample.transcriptions[k] for k in keep))

    def record_failure(self, index: int, error: Exception) -> None:
        """Image ``index`` failed to decode: raise (``on_error="raise"``) or count it and warn once."""
        if self.on_error == "raise":
            raise error
        if index not in self.failures:
            self.failures[index] = str(error)
            log.warning("%s split: skipped an image that cannot be decoded (on_error=skip; %d so far this run): %s",
                        self.split or "?", len(self.failures), error)

    def usable_index(self, index: int) -> int:
        """``index``, or the next sample that has not failed to decode (its stand-in in a batch)."""
        if len(self.failures) >= len(self.samples):
            raise ImageReadError(f"{self.split or '?'} split: every image failed to decode")
        while index in self.failures:
            index = (index + 1) % len(self.samples)
        return index

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def directory(self) -> Path | None:
        return self.samples[0].path.parent if self.samples else None

    @property
    def preloaded(self) -> bool:
        return self._bytes is not None

    @property
    def preloaded_bytes(self) -> int:
        return self._bytes.nbytes if self._bytes is not None else 0

    @property
    def decoded_bytes(self) -> int:
        return sum(a.nbytes for a in self._decoded) if self._decoded is not None else 0

    def file_bytes(self) -> int:
        """Sum of the split's file sizes (what preloading will hold)."""
        total = 0
        for s in self.samples:
            try:
                total += s.path.stat().st_size
            except OSError:
                pass
        return total

    def preload(self, shared: bool = True) -> None:
        """Read every image's encoded bytes into RAM (one shared buffer), with a progress bar."""
        if self._bytes is not None or not self.samples:
            return
        log.info("Preloading images from %s into RAM...", self.directory)
        loaded = [_read_bytes(s.path) for s in tqdm(self.samples, desc=f"Preloading {self.split}", unit="img", leave=False)]
        self._bytes = SharedBytes(loaded, shared=shared)
        log.info(
            "Preloaded %d/%d images into RAM (%.1f%%), %.1f MB%s",
            len(loaded), len(self.samples), 100.0 * len(loaded) / len(self.samples), self._bytes.nbytes / 2**20,
            " (in /dev/shm, mapped by every loader process)" if self._bytes.shared else "",
        )

    def encoded(self, index: int) -> bytes:
        if self._bytes is not None:
            return self._bytes[index]
        return _read_bytes(self.samples[index].path)

    def encoded_array(self, index: int) -> np.ndarray:
        if self._bytes is not None:
            return self._bytes.view(index)
        return np.frombuffer(self.encoded(index), dtype=np.uint8)

    # ----------------------------------------------------------------- decoded arrays

    @property
    def has_decoded(self) -> bool:
        return self._decoded is not None

    def decoded(self, index: int) -> tuple[np.ndarray, int] | None:
        """(RGB uint8 image decoded at 1/reduction size, reduction), or None when the
        split was not preloaded decoded."""
        if self._decoded is None:
            return None
        return self._decoded[index], self._decoded_reduction[index]

    def preload_decoded(self, reduction: Callable[[int, np.ndarray], int]) -> None:
        """Decode every image once and keep the RGB arrays (CPU backend).

        ``reduction(index, encoded)`` is the JPEG DCT reduction (1, 2, 4, 8) to decode
        image ``index`` at: the largest one that still leaves the resolution every
        geometry of the split needs (so rendering from the array is what rendering from
        the bytes would be for eval, and never upsamples in training)."""
        if self._decoded is not None or not self.samples:
            return
        from ocr.data.transforms import ImageDecodeError, decode_rgb

        log.info("Preloading decoded images from %s into RAM...", self.directory)
        arrays, reductions = [], []
        for i in tqdm(range(len(self.samples)), desc=f"Decoding {self.split}", unit="img", leave=False):
            encoded = self.encoded_array(i)
            r = reduction(i, encoded)
            try:
                image = decode_rgb(encoded, r, str(self.samples[i].path))
                height, width = self.sizes[i]
                expected = (-(-height // r), -(-width // r))
                if image.shape[:2] != expected:
                    raise ImageReadError(f"{self.samples[i].path}: decoded size {image.shape[1]}x{image.shape[0]} "
                                         f"does not match the header size {width}x{height} (reduction {r})")
            except (ImageDecodeError, ImageReadError) as exc:
                self.record_failure(i, exc)
                image, r = np.zeros((1, 1, 3), np.uint8), 1  # never read: usable_index skips it
            arrays.append(image)
            reductions.append(r)
        self._decoded, self._decoded_reduction = arrays, reductions
        log.info("Preloaded %d/%d decoded images into RAM (%.1f%%), %.1f MB", len(arrays), len(self.samples),
                 100.0 * len(arrays) / len(self.samples), self.decoded_bytes / 2**20)

    def decoded_estimate(self, reduction_of: Callable[[int], int]) -> int:
        """Bytes :meth:`preload_decoded` will hold, from the header sizes and the
        reduction ``reduction_of(index)`` each image is expected to be decoded at."""
        total = 0
        for i, (h, w) in enumerate(self.sizes):
            r = reduction_of(i)
            total += (-(-h // r)) * (-(-w // r)) * 3
        return total


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc})") from exc
