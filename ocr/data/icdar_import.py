"""Import ICDAR-style text labels (ICDAR 2015 task 4, SROIE task 1) into our JSON format.

One ``.txt`` per image, one word/line per row::

    x1,y1,x2,y2,x3,y3,x4,y4[,transcription]

Everything after the 8th comma is the transcription (it may contain commas). A UTF-8
BOM, CRLF line ends, blank lines and trailing whitespace are tolerated.

Pairing: an image ``<stem>.<jpg|jpeg|png>`` (extension case-insensitive) is labelled by
``<stem>.txt`` (SROIE) or ``gt_<stem>.txt`` (ICDAR 2015) in ``label_dir``.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from pathlib import Path

from .annotations import DONT_CARE, AnnotationError, read_text, save_annotations

__all__ = ["IMAGE_EXTENSIONS", "import_icdar_txt", "list_images", "parse_icdar_txt"]

log = logging.getLogger("ocr.data.icdar_import")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LABEL_PREFIX = "gt_"
MAX_LOGGED = 5


def list_images(image_dir: str | os.PathLike) -> list[Path]:
    """Image files (.jpg/.jpeg/.png, any case) directly in ``image_dir``, sorted by name."""
    image_dir = Path(image_dir)
    return sorted(
        (p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )


def _parse_number(tok: str) -> int | float:
    tok = tok.strip()
    if "_" in tok:  # int()/float() accept "1_000"; a label file should not
        raise ValueError("underscore")
    try:
        return int(tok)
    except ValueError:
        pass
    v = float(tok)  # ValueError propagates
    if not math.isfinite(v):
        raise ValueError("not finite")
    return int(v) if v.is_integer() else v


def parse_icdar_txt(
    label_path: str | os.PathLike, *, on_error: str = "raise"
) -> tuple[dict[str, dict], list[str]]:
    """Parse one label file.

    Returns ``(words, problems)``: ``words`` maps ``"0001"``, ``"0002"``, ... to
    ``{"points": [[x, y] * 4], "transcription": str}`` in line order; ``problems`` lists
    one message per unparseable line (only in ``on_error="skip"`` mode; in ``"raise"``
    mode the first one raises :class:`AnnotationError`). A file that cannot be read or
    decoded always raises.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    label_path = Path(label_path)
    text = read_text(label_path, "label file")

    words: dict[str, dict] = {}
    problems: list[str] = []
    # split on \n only: str.splitlines() would also split on \x0b, \x1c, \u2028 ... inside text
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip()  # CR, trailing spaces/tabs
        if lineno == 1:
            line = line.lstrip("\ufeff")  # a second BOM (seen in concatenated files)
        if not line.strip():
            continue
        fields = line.split(",", 8)
        what = None
        if len(fields) < 8:
            what = f"expected 8 comma-separated coordinates, found {len(fields)} field(s)"
        else:
            try:
                coords = [_parse_number(t) for t in fields[:8]]
            except ValueError:
                bad = next(t for t in fields[:8] if not _is_number(t))
                what = f"coordinate {bad.strip()!r} is not a finite number"
        if what is not None:
            msg = f"{label_path}, line {lineno}: {what}: {_clip(line)!r}"
            if on_error == "raise":
                raise AnnotationError(msg)
            problems.append(msg)
            continue
        transcription = fields[8] if len(fields) > 8 else ""
        points = [[coords[i], coords[i + 1]] for i in range(0, 8, 2)]
        words[f"{len(words) + 1:04d}"] = {"points": points, "transcription": transcription}
    return words, problems


def _is_number(tok: str) -> bool:
    try:
        _parse_number(tok)
        return True
    except ValueError:
        return False


def _clip(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _label_index(label_dir: Path) -> dict[str, list[Path]]:
    """image stem -> candidate label files (``<stem>.txt`` and ``gt_<stem>.txt``)."""
    index: dict[str, list[Path]] = {}
    for p in sorted(label_dir.iterdir(), key=lambda p: p.name):
        if not (p.is_file() and p.suffix.lower() == ".txt"):
            continue
        index.setdefault(p.stem, []).append(p)
        if p.stem.startswith(LABEL_PREFIX) and len(p.stem) > len(LABEL_PREFIX):
            index.setdefault(p.stem[len(LABEL_PREFIX):], []).append(p)
    return index


def import_icdar_txt(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    on_error: str = "raise",
) -> dict:
    """Convert a directory of ICDAR-format ``.txt`` labels to one annotation JSON.

    ``on_error="raise"`` raises :class:`AnnotationError` (naming file and line) at the
    first unparseable line, image without a label file, ambiguous pairing or unreadable
    label file. ``on_error="skip"`` drops bad lines (the rest of the image is kept),
    drops images without (or with ambiguous / unreadable) labels, counts everything and
    logs one warning. Label files without an image are never an error; they are counted
    (``orphan_labels``) and logged.

    Output image names are the image file names; word ids ``"0001"``.. follow line order.
    Returns stats: ``images`` (written), ``words``, ``dont_care``, ``skipped_lines``,
    ``images_without_labels``, ``ambiguous_labels``, ``unreadable_labels``,
    ``skipped_images`` (sum of the three previous), ``orphan_labels``, ``out_json``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    image_dir, label_dir, out_json = Path(image_dir), Path(label_dir), Path(out_json)
    for d, what in ((image_dir, "image"), (label_dir, "label")):
        if not d.is_dir():
            raise AnnotationError(f"{d}: {what} directory not found")

    images = list_images(image_dir)
    if not images:
        raise AnnotationError(f"{image_dir}: no images ({'/'.join(IMAGE_EXTENSIONS)}) found")
    stems = Counter(p.stem for p in images)
    index = _label_index(label_dir)

    problems: list[str] = []
    reasons: Counter[str] = Counter()

    def problem(reason: str, msg: str) -> None:
        if on_error == "raise":
            raise AnnotationError(msg)
        reasons[reason] += 1
        problems.append(msg)

    out: dict[str, dict] = {}
    used_labels: set[Path] = set()
    claimed: dict[Path, Path] = {}  # label file -> the image it was paired with
    n_words = n_dont_care = 0
    for img in images:
        cands = index.get(img.stem, [])
        used_labels.update(cands)
        if not cands:
            problem(
                "images_without_labels",
                f"{img}: no label file ({img.stem}.txt or {LABEL_PREFIX}{img.stem}.txt) in {label_dir}",
            )
            continue
        if len(cands) > 1 or stems[img.stem] > 1 or cands[0] in claimed:
            others = sorted({p.name for p in images if p.stem == img.stem} | (
                {claimed[cands[0]].name} if cands[0] in claimed else set()))
            problem(
                "ambiguous_labels",
                f"{img}: ambiguous pairing: label file(s) {[p.name for p in cands]} "
                f"for image(s) {others}",
            )
            continue
        claimed[cands[0]] = img
        try:
            words, bad_lines = parse_icdar_txt(cands[0], on_error=on_error)
        except AnnotationError as e:  # file-level: unreadable / not UTF-8
            if on_error == "raise":
                raise
            problem("unreadable_labels", str(e))
            continue
        for msg in bad_lines:
            problem("skipped_lines", msg)
        out[img.name] = {"words": words}
        n_words += len(words)
        n_dont_care += sum(1 for w in words.values() if w["transcription"] == DONT_CARE)

    orphans = sorted({p for ps in index.values() for p in ps} - used_labels, key=lambda p: p.name)
    if orphans:
        log.info(
            "%s: %d label file(s) without an image, e.g. %s",
            label_dir,
            len(orphans),
            ", ".join(p.name for p in orphans[:MAX_LOGGED]),
        )
    if problems:
        shown = "\n".join(f"  - {m}" for m in problems[:MAX_LOGGED])
        more = f"\n  ... and {len(problems) - MAX_LOGGED} more" if len(problems) > MAX_LOGGED else ""
        log.warning(
            "import %s: skipped %s\n%s%s",
            label_dir,
            ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())),
            shown,
            more,
        )

    save_annotations(out_json, out)
    stats = {
        "images": len(out),
        "words": n_words,
        "dont_care": n_dont_care,
        "skipped_lines": reasons["skipped_lines"],
        "images_without_labels": reasons["images_without_labels"],
        "ambiguous_labels": reasons["ambiguous_labels"],
        "unreadable_labels": reasons["unreadable_labels"],
        "skipped_images": reasons["images_without_labels"]
        + reasons["ambiguous_labels"]
        + reasons["unreadable_labels"],
        "orphan_labels": len(orphans),
        "out_json": str(out_json),
    }
    log.info("imported %d image(s), %d word(s) (%d don't-care) -> %s", len(out), n_words, n_dont_care, out_json)
    return stats
