"""Loading, validating and saving text-detection annotations.

Format (fixed contract)::

    {"images": {"<file name>": {"words": {"0001": {"points": [[x, y], ...],
                                                   "transcription": "..."}}}}}

* Points are pixels of the image *as displayed* (after EXIF orientation), at least
  4 points per polygon.
* ``transcription == "###"`` marks a don't-care word (masked from the loss, ignored
  by the metric). A missing (or ``null``) transcription is read as ``""``.
* ``"words": {}`` is a valid image without text.
* Extra fields (``score``, ``orientation``, ``language``, ...) are allowed and ignored.

``load_annotations`` validates everything it reads and either raises
:class:`AnnotationError` at the first problem (``on_error="raise"``) or drops the
offending word / image, collects every problem and logs a single summary warning
(``on_error="skip"``). :func:`check_annotations` returns the collected problems
instead of logging them (used by ``scripts/preprocess_data.py validate``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from numbers import Real
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping

import numpy as np

__all__ = [
    "DONT_CARE",
    "AnnotationError",
    "Problem",
    "Sample",
    "atomic_write_bytes",
    "check_annotations",
    "load_annotations",
    "samples_to_json",
    "save_annotations",
    "summarize_problems",
]

log = logging.getLogger("ocr.data.annotations")

DONT_CARE = "###"

#: how many individual messages the skip-mode summary warning shows
MAX_LOGGED_PROBLEMS = 5

_F32_MAX = float(np.finfo(np.float32).max)


class AnnotationError(ValueError):
    """Every message names the annotation file, the image and (where relevant) the
    word id and field, and what is wrong."""


@dataclass(frozen=True)
class Problem:
    """One validation problem found by :func:`check_annotations`.

    ``reason`` is a short stable key (e.g. ``"too_few_points"``), ``message`` the
    full human-readable text (the same text ``on_error="raise"`` raises with),
    ``level`` is ``"word"`` (the word was dropped) or ``"image"`` (the whole image
    entry was dropped).
    """

    reason: str
    message: str
    level: str
    image: str | None = None
    word_id: str | None = None


@dataclass(frozen=True)
class Sample:
    """One annotated image. Polygon arrays are read-only float32 ``(N, 2)``, N >= 4
    (copy before modifying: samples may be cached and shared between epochs)."""

    name: str  # file name as in the JSON
    path: Path  # image_dir / name
    polygons: tuple[np.ndarray, ...]  # each float32 (N, 2), N >= 4
    ignore: tuple[bool, ...]  # True for "###"
    word_ids: tuple[str, ...]
    transcriptions: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.polygons)
        if not (len(self.ignore) == len(self.word_ids) == len(self.transcriptions) == n):
            raise ValueError(
                f"Sample {self.name!r}: polygons/ignore/word_ids/transcriptions lengths differ "
                f"({n}, {len(self.ignore)}, {len(self.word_ids)}, {len(self.transcriptions)})"
            )

    @property
    def num_words(self) -> int:
        return len(self.polygons)

    # numpy arrays make the generated __eq__/__hash__ unusable: compare values instead.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sample):
            return NotImplemented
        return (
            self.name == other.name
            and self.path == other.path
            and self.ignore == other.ignore
            and self.word_ids == other.word_ids
            and self.transcriptions == other.transcriptions
            and len(self.polygons) == len(other.polygons)
            and all(np.array_equal(a, b) for a, b in zip(self.polygons, other.polygons))
        )

    def __hash__(self) -> int:
        return hash((self.name, self.path, self.word_ids, self.transcriptions, self.ignore))


# --------------------------------------------------------------------------- loading


class _JsonObject(dict):
    """dict produced by the JSON decoder that remembers duplicated keys (first value wins)."""

    __slots__ = ("duplicates",)

    def __init__(self) -> None:
        super().__init__()
        self.duplicates: list[str] = []


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    for key, value in pairs:
        if key in obj:
            obj.duplicates.append(key)
        else:
            obj[key] = value
    return obj


def _dups(obj: Any) -> list[str]:
    return list(getattr(obj, "duplicates", ()))


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text (BOM allowed) of ``path``; errors name the file and say what it is."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read {what}: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: {what} is not valid UTF-8 (byte offset {e.start})") from e


def _read_json(json_path: Path) -> Any:
    if not json_path.exists():
        raise AnnotationError(f"{json_path}: annotation file not found")
    if not json_path.is_file():
        raise AnnotationError(f"{json_path}: annotation path is not a file")
    text = read_text(json_path, "annotation file")
    try:
        return json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as e:
        raise AnnotationError(
            f"{json_path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from e
    except RecursionError as e:  # pathological nesting
        raise AnnotationError(f"{json_path}: not valid JSON: nested too deeply") from e


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, float) else repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _bad_name(name: str) -> str | None:
    """Why an image name is unusable as a path below image_dir (None if fine)."""
    if not name or not name.strip():
        return "image name is empty"
    if "\x00" in name:
        return "image name contains a NUL character"
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.anchor:
            return "image name must be a path relative to the image directory"
        if ".." in pure.parts:
            return "image name must not contain '..'"
    return None


class _Collector:
    def __init__(self, json_path: Path, on_error: str) -> None:
        self.json_path = json_path
        self.on_error = on_error
        self.problems: list[Problem] = []

    def add(
        self,
        reason: str,
        what: str,
        *,
        level: str,
        image: str | None = None,
        word_id: str | None = None,
        field: str | None = None,
    ) -> None:
        where = [str(self.json_path)]
        if image is not None:
            where.append(f"image {image!r}")
        if word_id is not None:
            where.append(f"word {word_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        message = ": ".join([", ".join(where), what])
        if self.on_error == "raise":
            raise AnnotationError(message)
        self.problems.append(Problem(reason, message, level, image, word_id))


def _parse_polygon(points: Any, col: _Collector, image: str, wid: str) -> np.ndarray | None:
    def bad(reason: str, what: str) -> None:
        col.add(reason, what, level="word", image=image, word_id=wid, field="points")

    if not isinstance(points, list):
        bad("bad_points", f"expected an array of [x, y] points, got {_type_name(points)}")
        return None
    if len(points) < 4:
        bad("too_few_points", f"has {len(points)} point(s), a polygon needs at least 4")
        return None
    out = np.empty((len(points), 2), dtype=np.float32)
    for k, pt in enumerate(points):
        if not isinstance(pt, list) or len(pt) != 2:
            bad("bad_point", f"point {k} is not a pair of numbers [x, y]: {_short(pt)}")
            return None
        for c, v in enumerate(pt):
            if isinstance(v, bool) or not isinstance(v, Real):
                bad(
                    "non_numeric_coordinate",
                    f"point {k} has a non-numeric {'xy'[c]} coordinate: {_short(v)}",
                )
                return None
            fv = float(v)
            if not math.isfinite(fv) or abs(fv) > _F32_MAX:  # float32 would overflow to inf
                bad(
                    "non_finite_coordinate",
                    f"point {k} has a non-finite {'xy'[c]} coordinate: {_short(v)}",
                )
                return None
            out[k, c] = fv
    out.setflags(write=False)
    return out


def _load(
    json_path: str | os.PathLike, image_dir: str | os.PathLike, check_images: bool, on_error: str
) -> tuple[list[Sample], list[Problem]]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    json_path = Path(json_path)
    image_dir = Path(image_dir)
    col = _Collector(json_path, on_error)

    data = _read_json(json_path)
    # file-level problems cannot be skipped
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{json_path}: top level must be an object with an \"images\" key, got {_type_name(data)}"
        )
    if "images" in _dups(data):
        raise AnnotationError(f"{json_path}: top-level key \"images\" appears more than once")
    if "images" not in data:
        raise AnnotationError(f"{json_path}: top-level key \"images\" is missing")
    images = data["images"]
    if not isinstance(images, dict):
        raise AnnotationError(
            f"{json_path}: top-level \"images\" must be an object mapping file names to entries, "
            f"got {_type_name(images)}"
        )

    for name, n in Counter(_dups(images)).items():
        col.add(
            "duplicate_image",
            f"image name appears {n + 1} times in \"images\" (keeping the first entry)",
            level="image",
            image=name,
        )

    samples: list[Sample] = []
    for name, entry in images.items():
        why = _bad_name(name)
        if why is not None:
            col.add("bad_image_name", why, level="image", image=name)
            continue
        if not isinstance(entry, dict):
            col.add(
                "bad_image_entry",
                f"image entry must be an object with a \"words\" key, got {_type_name(entry)}",
                level="image",
                image=name,
            )
            continue
        if "words" in _dups(entry):
            col.add("bad_words", "key appears more than once", level="image", image=name, field="words")
            continue
        if "words" not in entry:
            col.add("missing_words", "image entry has no \"words\" key", level="image", image=name)
            continue
        words = entry["words"]
        if not isinstance(words, dict):
            col.add(
                "bad_words",
                f"must be an object mapping word ids to words, got {_type_name(words)}",
                level="image",
                image=name,
                field="words",
            )
            continue
        path = image_dir / name
        if check_images and not path.is_file():
            col.add(
                "missing_image_file",
                f"image file not found: {path}",
                level="image",
                image=name,
            )
            continue

        for wid, n in Counter(_dups(words)).items():
            col.add(
                "duplicate_word_id",
                f"word id appears {n + 1} times in \"words\" (keeping the first)",
                level="word",
                image=name,
                word_id=wid,
            )

        polys: list[np.ndarray] = []
        ignore: list[bool] = []
        wids: list[str] = []
        texts: list[str] = []
        for wid, word in words.items():
            if not isinstance(word, dict):
                col.add(
                    "bad_word",
                    f"word must be an object with \"points\", got {_type_name(word)}",
                    level="word",
                    image=name,
                    word_id=wid,
                )
                continue
            dup_fields = [f for f in ("points", "transcription") if f in _dups(word)]
            if dup_fields:
                col.add(
                    "duplicate_field",
                    "key appears more than once in the word",
                    level="word",
                    image=name,
                    word_id=wid,
                    field=dup_fields[0],
                )
                continue
            if "points" not in word:
                col.add(
                    "missing_points",
                    "word has no \"points\"",
                    level="word",
                    image=name,
                    word_id=wid,
                    field="points",
                )
                continue
            text = word.get("transcription")
            if text is None:
                text = ""
            elif not isinstance(text, str):
                col.add(
                    "bad_transcription",
                    f"must be a string, got {_type_name(text)}: {_short(text)}",
                    level="word",
                    image=name,
                    word_id=wid,
                    field="transcription",
                )
                continue
            poly = _parse_polygon(word["points"], col, name, wid)
            if poly is None:
                continue
            polys.append(poly)
            ignore.append(text == DONT_CARE)
            wids.append(wid)
            texts.append(text)

        samples.append(
            Sample(
                name=name,
                path=path,
                polygons=tuple(polys),
                ignore=tuple(ignore),
                word_ids=tuple(wids),
                transcriptions=tuple(texts),
            )
        )

    samples.sort(key=lambda s: s.name)
    return samples, col.problems


def summarize_problems(problems: list[Problem], max_messages: int = MAX_LOGGED_PROBLEMS) -> str:
    """Counts per reason plus the first few messages, as one (multi-line) string."""
    counts = Counter(p.reason for p in problems)
    n_img = sum(1 for p in problems if p.level == "image")
    parts = ", ".join(f"{r}={n}" for r, n in sorted(counts.items()))
    lines = [
        f"{len(problems)} problem(s) [{parts}]; dropped {n_img} image entry(ies) and "
        f"{len(problems) - n_img} word(s)"
    ]
    shown = problems[:max_messages]
    lines += [f"  - {p.message}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


def load_annotations(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    check_images: bool = True,
    on_error: str = "raise",
) -> list[Sample]:
    """Validate and load an annotation file.

    Errors (each with a distinct message naming the file, image, word id and field):
    file missing / not JSON (with line/col); top-level ``"images"`` missing or not an
    object; an image entry without ``"words"`` or ``"words"`` not an object; a word
    without ``"points"``; fewer than 4 points; a point that is not a pair of numbers;
    non-numeric, NaN or infinite coordinates; duplicate image names and duplicate word
    ids (duplicate JSON keys); a non-string transcription; an image name that is not
    a relative path; missing image file (when ``check_images``).

    ``on_error="raise"`` raises :class:`AnnotationError` at the first problem.
    ``on_error="skip"`` drops the bad word (or the whole image entry for image-level
    problems: missing file, bad ``"words"``, duplicate name -> the later entries), logs
    ONE warning on logger ``ocr.data.annotations`` with the counts per reason and the
    first few messages, and returns the rest. File-level problems always raise.

    Samples are sorted by name; words keep the file order.
    """
    samples, problems = _load(json_path, image_dir, check_images, on_error)
    if problems:
        log.warning("%s: skipped bad annotations: %s", json_path, summarize_problems(problems))
    return samples


def check_annotations(
    json_path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    check_images: bool = True,
) -> tuple[list[Sample], list[Problem]]:
    """Like ``load_annotations(..., on_error="skip")`` but returns the problems instead
    of logging them. File-level problems still raise :class:`AnnotationError`."""
    return _load(json_path, image_dir, check_images, "skip")


# --------------------------------------------------------------------------- saving


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fault_point: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync,
    ``os.replace``. Parent directories are created. An existing file's permission
    bits are kept; new files get 0o644. ``fault_point``: the ``ocr.faults`` point called
    between the write and the rename (tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if fault_point:
            from ocr import faults

            faults.inject(fault_point)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _plain_number(v: Any, where: str) -> int | float:
    """A JSON-friendly plain number: integral values as int, float32 values with the
    shortest repr that round-trips to the same float32."""
    if isinstance(v, bool) or not isinstance(v, (Real, np.number)):
        raise ValueError(f"{where}: coordinate is not a number: {v!r}")
    if isinstance(v, (np.float32, np.float16)):
        f = float(str(v))  # numpy prints the shortest round-tripping repr
    else:
        f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{where}: coordinate is not finite: {v!r}")
    if f.is_integer() and abs(f) < 2**53:
        return int(f)
    return f


def _points_to_json(points: Any, where: str) -> list[list[int | float]]:
    arr = points
    if isinstance(points, np.ndarray):
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"{where}: points must have shape (N, 2), got {points.shape}")
        arr = list(points)
    out = []
    for pt in arr:
        if len(pt) != 2:
            raise ValueError(f"{where}: point is not a pair: {pt!r}")
        out.append([_plain_number(pt[0], where), _plain_number(pt[1], where)])
    return out


def _sample_entry(s: Sample) -> dict:
    words = {}
    for wid, poly, text in zip(s.word_ids, s.polygons, s.transcriptions):
        words[wid] = {
            "points": _points_to_json(poly, f"image {s.name!r}, word {wid!r}"),
            "transcription": text,
        }
    return {"words": words}


def _mapping_entry(name: str, entry: Mapping) -> dict:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("words"), Mapping):
        raise ValueError(f"image {name!r}: entry must be a mapping with a \"words\" mapping")
    out = {k: v for k, v in entry.items() if k != "words"}
    words = {}
    for wid, word in entry["words"].items():
        if not isinstance(word, Mapping) or "points" not in word:
            raise ValueError(f"image {name!r}, word {wid!r}: word must be a mapping with \"points\"")
        w = dict(word)
        w["points"] = _points_to_json(word["points"], f"image {name!r}, word {wid!r}")
        words[str(wid)] = w
    out["words"] = words
    return out


def samples_to_json(samples: Iterable[Sample]) -> dict:
    """The ``{"images": {...}}`` dict for ``samples`` (in the given order)."""
    images: dict[str, dict] = {}
    for s in samples:
        if s.name in images:
            raise ValueError(f"duplicate image name {s.name!r}")
        images[s.name] = _sample_entry(s)
    return {"images": images}


def _is_full_document(d: Mapping) -> bool:
    """``{"images": {...}}`` rather than the bare name -> entry mapping."""
    if set(d.keys()) != {"images"} or not isinstance(d["images"], Mapping):
        return False
    # an image literally named "images" would have a "words" key
    return "words" not in d["images"]


def save_annotations(
    json_path: str | os.PathLike, samples_or_images: list[Sample] | Mapping
) -> None:
    """Write our format atomically (temp file in the same dir + os.replace).

    Accepts a list of :class:`Sample` or the ``{"<name>": {"words": {...}}}`` mapping
    (the full ``{"images": {...}}`` document is accepted too). Coordinates are written
    as plain JSON numbers (integral values as ints); extra fields in a mapping are kept.
    """
    if isinstance(samples_or_images, Mapping):
        images = samples_or_images
        if _is_full_document(images):
            images = images["images"]
        doc = {"images": {str(name): _mapping_entry(str(name), e) for name, e in images.items()}}
    else:
        items = list(samples_or_images)
        bad = [type(s).__name__ for s in items if not isinstance(s, Sample)]
        if bad:
            raise TypeError(f"save_annotations expects Samples or a mapping, got {bad[0]}")
        doc = samples_to_json(items)
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False)
    atomic_write_bytes(json_path, (text + "\n").encode("utf-8"))
