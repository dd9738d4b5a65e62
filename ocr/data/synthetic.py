"""Built-in synthetic receipt dataset (no downloads: OpenCV Hershey fonts, numpy, cv2).

Layout written by :func:`generate_dataset`::

    <root>/images/{train,val,test}/<split>_<index:05d>.jpg
    <root>/jsons/{train,val,test}.json
    <root>/DATASET.json        # {"generator": "synthetic_receipts", "version": ..., "seed": ..., counts}

Each JSON follows the annotation contract (see :mod:`ocr.data.annotations`)::

    {"images": {"train_00012.jpg": {"words": {"0001": {"points": [[x, y] * 4],
                                                        "transcription": "TOTAL"}}}}}

Points are original-image pixel coordinates (pixel (row i, col j) covers x in [j, j+1),
y in [i, i+1)), 4 per word, clockwise from the top-left corner of the unrotated word.
``"###"`` marks a smudged, unreadable word (don't care).

Every receipt is drawn flat on a "paper" canvas, one word at a time. A word box spans the
style's ascender..descender band vertically (measured once per style by rendering reference
strings, so it does not depend on how a given OpenCV version defines ``getTextSize``'s
height) and the word's own measured ink horizontally, plus 1-2 px of padding. The paper is
then warped into the final image with one homography (small rotation + mild perspective);
the same homography maps the 4 box corners, so the polygons stay exact.

Fonts: only what OpenCV itself ships (no downloads). ``cv2.FONT_HERSHEY_*`` (+ italic,
thickness); note that OpenCV >= 5 renders these names with its embedded sans font rather
than the old stroke fonts, so with OpenCV 5 the built-in ``cv2.FontFace`` faces "sans",
"italic" and "uni" (variable weight) are mixed in for typeface variety.

Sizes are chosen for a network input whose longer side is ~512 px: after scaling the
image's longer side to 512 px the shorter side of every readable word box is >= 10 px
(:data:`MIN_SIDE_AT_512`), enforced while rendering.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

__all__ = [
    "DONT_CARE",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "MIN_SIDE_AT_512",
    "SPLITS",
    "ensure_dataset",
    "generate_dataset",
    "render_receipt",
]

log = logging.getLogger("ocr.data.synthetic")

#: bump whenever the rendered images / annotations change, so cached datasets regenerate
GENERATOR_VERSION = 1
GENERATOR_NAME = "synthetic_receipts"
SPLITS = ("train", "val", "test")
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DONT_CARE = "###"

#: the network sees the image with its longer side scaled to this many pixels
TARGET_LONG_SIDE = 512
#: minimum shorter side (px, at TARGET_LONG_SIDE) of every readable word box
MIN_SIDE_AT_512 = 10.0
# internal safety margin over MIN_SIDE_AT_512 applied while rendering
_MIN_SIDE_RENDER = 10.4

_MARKER = "DATASET.json"

# --------------------------------------------------------------------------- vocabulary

_SHOP_A = ["FRESH", "GREEN", "SUNRISE", "CORNER", "CITY", "GOLDEN", "HAPPY", "BLUE", "RED",
           "OLD TOWN", "NORTH", "DAILY", "LUCKY", "ROYAL", "SILVER", "URBAN", "MAPLE", "OCEAN",
           "STAR", "PARK", "BRIGHT", "HARBOR", "FAMILY", "VILLAGE"]
_SHOP_B = ["MART", "CAFE", "BAKERY", "GROCER", "MARKET", "DELI", "DINER", "PHARMACY", "STORE",
           "KITCHEN", "BISTRO", "SUPERMARKET", "BOOKS", "HARDWARE", "FOODS", "COFFEE", "PIZZA",
           "NOODLE BAR", "TEA HOUSE", "BUTCHER", "OUTLET"]
_SHOP_C = ["", "", "", "", "LTD", "& CO", "INC", "EXPRESS", "24H", "PLUS"]
_STREETS = ["MAIN", "OAK", "PINE", "MAPLE", "CEDAR", "ELM", "LAKE", "HILL", "RIVER", "PARK",
            "MARKET", "HIGH", "CHURCH", "MILL", "STATION", "BRIDGE", "KING", "QUEEN"]
_STREET_T = ["ST", "AVE", "RD", "BLVD", "LN", "DR", "WAY", "STREET", "ROAD"]
_CITIES = ["SPRINGFIELD", "RIVERSIDE", "FAIRVIEW", "MADISON", "GEORGETOWN", "CLINTON",
           "SALEM", "FRANKLIN", "GREENVILLE", "BRISTOL", "DOVER", "ASHLAND", "OXFORD",
           "MILTON", "NEWPORT", "CHESTER", "AUBURN", "HUDSON"]
_NAMES = ["ANNA", "JOHN", "MARIA", "DAVID", "LUCY", "PETER", "SARA", "TOM", "NINA", "OMAR",
          "KEVIN", "JULIA", "MIKE", "EMMA", "LEO", "IRIS"]
_ITEMS = ["COFFEE LATTE", "CAPPUCCINO", "ESPRESSO", "AMERICANO", "GREEN TEA", "ICED TEA",
          "ORANGE JUICE", "APPLE JUICE", "MINERAL WATER", "COLA 330ML", "SPARKLING WATER",
          "CROISSANT", "BAGEL", "MUFFIN", "DONUT", "CHEESECAKE", "BROWNIE", "COOKIE",
          "WHOLE MILK 1L", "BREAD LOAF", "EGGS 12PK", "BUTTER 250G", "CHEDDAR", "YOGURT",
          "BANANAS", "APPLES 1KG", "TOMATOES", "POTATOES 2KG", "ONIONS", "CARROTS", "RICE 1KG",
          "PASTA", "OLIVE OIL", "SUGAR 1KG", "FLOUR", "CHICKEN BREAST", "GROUND BEEF",
          "SALMON FILLET", "HAM SLICES", "TUNA CAN", "CEREAL", "OATMEAL", "HONEY", "JAM",
          "PEANUT BUTTER", "CHOCOLATE BAR", "CHIPS", "SALSA", "SOAP", "SHAMPOO", "TOOTHPASTE",
          "PAPER TOWELS", "DISH SOAP", "BATTERIES AA", "LIGHT BULB", "NOTEBOOK", "PEN BLUE",
          "CHEESEBURGER", "FRIES LARGE", "CHICKEN WRAP", "CAESAR SALAD", "SOUP OF DAY",
          "VEGGIE PIZZA", "PEPPERONI", "SPRING ROLLS", "FRIED RICE", "PAD THAI", "RAMEN",
          "SANDWICH", "HOT DOG", "ICE CREAM", "MILKSHAKE", "SMOOTHIE", "WATERMELON",
          "GRAPES", "LEMONS", "AVOCADO", "MUSHROOMS", "GARLIC", "SPINACH", "LETTUCE"]
_FOOTERS = [["THANK YOU"], ["THANK YOU", "PLEASE COME AGAIN"], ["THANK YOU FOR SHOPPING"],
            ["HAVE A NICE DAY"], ["THANK YOU!", "SEE YOU SOON"], ["NO REFUNDS WITHOUT RECEIPT"],
            ["THANK YOU", "KEEP YOUR RECEIPT"], ["THANKS FOR VISITING"],
            ["THANK YOU", "VISIT US ONLINE"], ["GOODS SOLD ARE NOT", "RETURNABLE"]]
_PAYMENTS = ["CASH", "VISA", "MASTERCARD", "DEBIT", "AMEX", "CARD"]


def _money(v: float, cur: str, comma: bool) -> str:
    s = f"{v:.2f}"
    if comma:
        s = s.replace(".", ",")
    return cur + s


def _title(s: str, title_case: bool) -> str:
    return s.title() if title_case else s


def _build_content(rng: np.random.Generator, max_items: int, title_case: bool) -> dict[str, Any]:
    """The text of one receipt (before fitting it to the paper)."""
    shop = " ".join(w for w in (str(rng.choice(_SHOP_A)), str(rng.choice(_SHOP_B)),
                                 str(rng.choice(_SHOP_C))) if w)
    header: list[str] = []
    if rng.random() < 0.75:
        header.append(f"{int(rng.integers(1, 999))} {rng.choice(_STREETS)} {rng.choice(_STREET_T)}")
    if rng.random() < 0.45:
        header.append(f"{rng.choice(_CITIES)} {int(rng.integers(10000, 99999))}")
    if rng.random() < 0.6:
        header.append(f"TEL {int(rng.integers(200, 999))}-{int(rng.integers(100, 999))}-"
                      f"{int(rng.integers(1000, 9999)):04d}")
    header = [_title(h, title_case) for h in header]

    d, m, y = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(2015, 2026))
    date = rng.choice([f"{d:02d}/{m:02d}/{y}", f"{m:02d}/{d:02d}/{y}", f"{y}-{m:02d}-{d:02d}",
                       f"{d:02d}.{m:02d}.{y % 100:02d}"])
    hh, mm = int(rng.integers(7, 23)), int(rng.integers(0, 60))
    time = f"{hh:02d}:{mm:02d}" if rng.random() < 0.7 else f"{hh % 12 or 12}:{mm:02d}{rng.choice(['AM', 'PM'])}"
    meta: list[tuple[str, str]] = []
    kind = rng.random()
    if kind < 0.4:
        meta.append((str(date), time))
    elif kind < 0.7:
        meta.append((f"DATE {date}", f"TIME {time}"))
    else:
        meta.append((str(date), time))
        if rng.random() < 0.5:
            meta.append((f"RECEIPT #{int(rng.integers(1000, 999999))}", f"POS {int(rng.integers(1, 20))}"))
        else:
            meta.append((f"CASHIER {rng.choice(_NAMES)}", f"#{int(rng.integers(100, 9999))}"))

    cur = str(rng.choice(["", "", "", "$", "$"]))
    comma = bool(rng.random() < 0.2)
    n_items = int(rng.integers(min(3, max_items), max_items + 1))
    items = []
    for name in rng.choice(_ITEMS, size=n_items, replace=False):
        q = int(rng.choice([1, 1, 1, 1, 2, 2, 3, 4, 6]))
        price = float(rng.choice([0.5, 0.99, 1.25, 1.5, 2.0, 2.49, 2.75, 3.5, 3.99, 4.25, 5.0,
                                  6.5, 7.99, 8.75, 9.5, 12.0, 14.99, 18.5, 24.0]))
        if rng.random() < 0.3:
            price = round(float(rng.uniform(0.3, 40.0)), 2)
        amount = q * price
        mid = None
        if q > 1 or rng.random() < 0.25:
            p = _money(price, "", comma)
            mid = str(rng.choice([f"{q} x {p}", f"{q}x {p}", f"{q} @ {p}", f"{q}x{p}", f"QTY {q}"]))
        items.append((_title(str(name), title_case), mid, _money(amount, cur, comma), amount))

    # totals / payment: random choices now, amounts computed from the items actually printed
    tax_rate = float(rng.choice([0.0, 5.0, 7.0, 8.25, 10.0, 13.0, 19.0, 20.0]))
    show_subtotal = tax_rate > 0 or rng.random() < 0.5
    tax_label = str(rng.choice([f"TAX {tax_rate:g}%", "TAX", f"VAT {tax_rate:g}%", "SALES TAX"]))
    total_label = str(rng.choice(["TOTAL", "TOTAL", "TOTAL DUE", "AMOUNT DUE", "GRAND TOTAL"]))
    method = str(rng.choice(_PAYMENTS))
    show_pay = rng.random() < 0.7
    cash_extra = float(rng.choice([0, 0, 5, 10]))
    card_line = (f"CARD ****{int(rng.integers(0, 9999)):04d}",
                 str(rng.choice(["APPROVED", "AUTH OK", ""]))) if rng.random() < 0.5 else None
    show_count = rng.random() < 0.3

    def summary(amounts: list[float]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        subtotal = float(sum(amounts))
        tax = round(subtotal * tax_rate / 100.0, 2)
        total = subtotal + tax
        totals: list[tuple[str, str]] = []
        if show_subtotal:
            totals.append(("SUBTOTAL", _money(subtotal, cur, comma)))
        if tax_rate > 0:
            totals.append((tax_label, _money(tax, cur, comma)))
        totals.append((total_label, _money(total, cur, comma)))
        pay: list[tuple[str, str]] = []
        if show_pay:
            if method == "CASH":
                given = math.ceil(total / 5.0) * 5.0 + cash_extra
                pay.append(("CASH", _money(given, cur, comma)))
                pay.append(("CHANGE", _money(given - total, cur, comma)))
            else:
                pay.append((method, _money(total, cur, comma)))
                if card_line is not None:
                    pay.append(card_line)
        if show_count:
            pay.append((f"ITEMS {len(amounts)}", ""))
        return totals, pay

    footer = [_title(f, title_case and rng.random() < 0.5) for f in _FOOTERS[int(rng.integers(len(_FOOTERS)))]]
    if rng.random() < 0.25:
        footer.append(f"WWW.{shop.split()[0]}{shop.split()[1] if len(shop.split()) > 1 else ''}.COM".replace("&", ""))
    return {"shop": shop, "header": header, "meta": meta, "items": items, "summary": summary,
            "footer": footer}


# --------------------------------------------------------------------------- fonts
#
# Two renderers, both built into OpenCV (no font files, no downloads):
#  * "hershey": cv2.putText with cv2.FONT_HERSHEY_* (+ FONT_ITALIC) and a line thickness.
#    OpenCV 4 draws the classic Hershey stroke fonts; OpenCV >= 5 draws them with its
#    embedded sans font (thickness 1 = regular, >= 2 = bold).
#  * "face" (OpenCV >= 5 only): cv2.FontFace("sans" | "italic" | "uni") with a pixel size and a
#    variable weight (100..1000), for more typeface/weight variety.
# Box geometry never relies on font metrics alone: the vertical ink extent of every style is
# measured by rendering reference strings (cached), the width comes from the text size query.

_HERSHEY_FACES = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX,
                  cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX_SMALL]
_HERSHEY_FACE_P = [0.24, 0.14, 0.2, 0.16, 0.12, 0.14]
_HERSHEY_SCRIPT = [cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, cv2.FONT_HERSHEY_SCRIPT_COMPLEX]
_HAS_FONTFACE = hasattr(cv2, "FontFace")
_FACE_NAMES = ("sans", "italic", "uni")
_FONTFACES: dict[str, Any] = {}


def _fontface(name: str) -> Any:
    ff = _FONTFACES.get(name)
    if ff is None:
        ff = _FONTFACES[name] = cv2.FontFace(name)
    return ff


# reference strings for the vertical ink extent of a style: cap / ascender top, descender bottom
_TOP_REF = "HAMbdfhklt0123456789$()"
_BOTTOM_REF = "gjpqy,;$()"


@dataclass(frozen=True)
class _Style:
    """One font style. ``renderer`` "hershey": ``face`` is a cv2.FONT_HERSHEY_* int, ``size`` the
    font scale, ``weight`` the line thickness. "face": ``face`` is a FontFace name, ``size`` the
    pixel size, ``weight`` the variable-font weight. ``embolden`` > 0 fakes bold by drawing the
    text again shifted right by that many pixels."""

    renderer: str
    face: Any
    size: float
    weight: int
    embolden: int = 0

    def _put(self, img: np.ndarray, text: str, org: tuple[int, int]) -> None:
        for dx in range(self.embolden + 1):
            o = (int(org[0]) + dx, int(org[1]))
            if self.renderer == "hershey":
                cv2.putText(img, text, o, self.face, self.size, 255, self.weight, cv2.LINE_AA)
            else:
                cv2.putText(img, text, o, 255, _fontface(self.face), int(self.size), int(self.weight))

    def draw(self, img: np.ndarray, text: str, x: int, baseline: int) -> None:
        self._put(img, text, (x, baseline))

    def width(self, text: str) -> int:
        """Right edge of the text's box relative to the origin x (the ink lies inside)."""
        return _text_width(self, text)

    @property
    def extent(self) -> tuple[int, int]:
        return _ink_extent(self)

    @property
    def pad(self) -> int:
        top, bottom = self.extent
        return 1 if bottom - top < 28 else 2

    @property
    def box_h(self) -> int:
        """Height of a word box (ink extent of ascenders..descenders + padding)."""
        top, bottom = self.extent
        return bottom - top + 1 + 2 * self.pad

    @property
    def space(self) -> int:
        return max(2, self.width("0 0") - self.width("00"))

    def text_width(self, text: str) -> int:
        words = text.split()
        if not words:
            return 0
        return sum(self.width(w) for w in words) + self.space * (len(words) - 1)

    def bolder(self, rng: np.random.Generator) -> _Style:
        if self.renderer == "hershey":
            return replace(self, weight=self.weight + max(1, int(round(self.weight * rng.uniform(0.5, 1.0)))))
        if self.face == "uni":  # not a variable font: fake it
            return replace(self, embolden=self.embolden + max(1, int(round(self.size * 0.05))))
        return replace(self, weight=min(900, self.weight + int(rng.integers(200, 350))))

    def with_size(self, size: float) -> _Style:
        size = round(size, 3) if self.renderer == "hershey" else int(round(size))
        return replace(self, size=size)


@lru_cache(maxsize=65536)
def _text_width(style: _Style, text: str) -> int:
    if style.renderer == "hershey":
        w = int(cv2.getTextSize(text, style.face, style.size, style.weight)[0][0])
    else:
        rx, _, rw, _ = cv2.getTextSize((0, 0), text, (0, 0), _fontface(style.face), int(style.size), int(style.weight))
        w = int(rx + rw) + 1
    return w + style.embolden


@lru_cache(maxsize=8192)
def _ink_extent(style: _Style) -> tuple[int, int]:
    """Rows (relative to the baseline) of the topmost ascender ink and the lowest descender ink,
    counting pixels with >= 25% coverage."""
    if style.renderer == "hershey":
        big = int(math.ceil(style.size * 40)) + 8 + style.weight
    else:
        big = int(math.ceil(style.size * 1.2)) + 8
    w = style.width(_TOP_REF + _BOTTOM_REF) + 2 * big
    oy = 2 * big
    canvas = np.zeros((4 * big, w), np.uint8)
    style.draw(canvas, _TOP_REF, big, oy)
    rows = np.flatnonzero((canvas >= 64).any(axis=1))
    top = int(rows[0]) - oy
    canvas[:] = 0
    style.draw(canvas, _TOP_REF + _BOTTOM_REF, big, oy)
    rows = np.flatnonzero((canvas >= 64).any(axis=1))
    bottom = int(rows[-1]) - oy
    return top, bottom


def _pick_style(rng: np.random.Generator, heading: bool) -> _Style:
    """A random style at a nominal size (resized later by :func:`_fit_box_h`)."""
    if _HAS_FONTFACE and rng.random() < 0.55:
        name = str(rng.choice(_FACE_NAMES, p=[0.55, 0.15, 0.30]))
        lo, hi = (350, 800) if heading else (300, 650)
        return _Style("face", name, 30, int(rng.integers(lo, hi + 1)))
    if heading and rng.random() < 0.15:
        face = int(rng.choice(_HERSHEY_SCRIPT))
    else:
        face = int(rng.choice(_HERSHEY_FACES, p=_HERSHEY_FACE_P))
    if rng.random() < (0.1 if heading else 0.07):
        face |= cv2.FONT_ITALIC
    return _Style("hershey", face, 1.0, 1)


def _fit_box_h(style: _Style, box_h: float, rng: np.random.Generator) -> _Style:
    """``style`` resized so its word boxes are (at least) ``box_h`` px tall."""
    if style.renderer == "hershey":
        ratio = float(rng.uniform(0.035, 0.075))
        if style.face & 15 in (cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_COMPLEX_SMALL):
            ratio *= 1.5
        style = replace(style, weight=max(1, int(round(box_h * ratio))))
    h1 = style.box_h
    size = max(0.3 if style.renderer == "hershey" else 6.0, style.size * box_h / h1)
    st = style.with_size(size)
    for _ in range(12):
        if st.box_h >= box_h:
            break
        size *= 1.0 + max(0.02, (box_h - st.box_h) / max(box_h, 1.0))
        st = style.with_size(size if style.renderer == "hershey" else max(size, st.size + 1))
    return st


# --------------------------------------------------------------------------- paper layout


class _Paper:
    """Flat receipt paper: an ink coverage mask plus the word / separator boxes drawn on it."""

    def __init__(self, w: int, h: int, left: int, right: int) -> None:
        self.w, self.h = w, h
        self.left, self.right = left, right
        self.mask = np.zeros((h, w), np.uint8)
        self.words: list[dict[str, Any]] = []  # {"box": (x0, y0, x1, y1), "text": str}
        self.seps: list[tuple[float, float, float, float]] = []

    def crop(self, h: int) -> None:
        self.h = h
        self.mask = self.mask[:h]

    def draw_word(self, text: str, x: int, line_top: int, style: _Style, line_box_h: int) -> None:
        """Draw one word at origin (x, baseline) and record its box: vertically the style's
        ascender..descender band (the same for every word of the line), horizontally the
        word's measured ink, each side padded by ``style.pad`` px (and grown if a glyph pokes out)."""
        top, bottom = style.extent
        pad = style.pad
        x, baseline = int(x), int(line_top + (line_box_h - style.box_h) + pad - top)  # bottom-aligned
        # render on a private canvas to measure this word's ink, then merge it into the mask
        m = style.box_h
        canvas = np.zeros((bottom - top + 1 + 2 * m, style.width(text) + 2 * m), np.uint8)
        cy = m - top
        style.draw(canvas, text, m, cy)
        ox, oy = x - m, baseline - cy  # mask position of canvas (0, 0)
        lo_y, lo_x = max(0, oy), max(0, ox)
        hi_y, hi_x = min(self.h, oy + canvas.shape[0]), min(self.w, ox + canvas.shape[1])
        if hi_y > lo_y and hi_x > lo_x:
            dst = self.mask[lo_y:hi_y, lo_x:hi_x]
            np.maximum(dst, canvas[lo_y - oy:hi_y - oy, lo_x - ox:hi_x - ox], out=dst)
        y0, y1 = float(baseline + top - pad), float(baseline + bottom + 1 + pad)
        rows = np.flatnonzero((canvas >= 64).any(axis=1))
        cols = np.flatnonzero((canvas >= 64).any(axis=0))
        if cols.size:
            x0, x1 = float(ox + cols[0] - pad), float(ox + cols[-1] + 1 + pad)
            y0, y1 = min(y0, float(oy + rows[0] - pad)), max(y1, float(oy + rows[-1] + 1 + pad))
        else:  # nothing visible (cannot happen with the vocabulary used): advance box
            x0, x1 = float(x), float(x + style.width(text))
        # very narrow words ("1", "x", "@"): widen the box so its shorter side stays usable
        min_w = 0.85 * (y1 - y0)
        if x1 - x0 < min_w:
            c = 0.5 * (x0 + x1)
            x0, x1 = c - 0.5 * min_w, c + 0.5 * min_w
        self.words.append({"box": (x0, y0, x1, y1), "text": text})

    def draw_text(self, text: str, x: int, line_top: int, style: _Style, line_box_h: int) -> None:
        for word in text.split():
            self.draw_word(word, x, line_top, style, line_box_h)
            x += style.width(word) + style.space


def _truncate(text: str, style: _Style, max_w: int) -> str:
    """Drop trailing words (then characters) until ``text`` fits in ``max_w``."""
    words = text.split()
    while len(words) > 1 and style.text_width(" ".join(words)) > max_w:
        words.pop()
    t = " ".join(words)
    while len(t) > 2 and style.text_width(t) > max_w:
        t = t[:-1].rstrip()
    return t if style.text_width(t) <= max_w else ""


@dataclass
class _Line:
    kind: str  # "center" | "lr" | "sep" | "gap"
    left: str = ""
    mid: str | None = None
    right: str = ""
    style: _Style | None = None
    label_indent: float = 0.0  # fraction of the text width where the left text starts


def _sep_line(rng: np.random.Generator) -> _Line:
    return _Line("sep", left=str(rng.choice(["dash", "dash", "text-", "text=", "text*", "solid", "dots"])))


# --------------------------------------------------------------------------- image effects


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth random field in [-1, 1]-ish, float32 (h, w)."""
    gh, gw = max(2, cells), max(2, int(round(cells * w / max(h, 1))))
    g = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed 2048x2048 tile of N(0, 1) noise (int8, x32), cropped per image: far cheaper than
    drawing fresh full-resolution noise for every image."""
    g = np.random.default_rng(0x5EED).standard_normal((2048, 2048), dtype=np.float32)
    return np.clip(np.rint(g * 32.0), -127, 127).astype(np.int8)


def _noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Gaussian-looking grain, float32 (h, w), std ~ sigma."""
    bank = _noise_bank()
    if h > bank.shape[0] or w > bank.shape[1]:  # never with the sizes used here
        return rng.standard_normal((h, w), dtype=np.float32) * np.float32(sigma)
    oy = int(rng.integers(0, bank.shape[0] - h + 1))
    ox = int(rng.integers(0, bank.shape[1] - w + 1))
    crop = bank[oy:oy + h, ox:ox + w]
    if rng.random() < 0.5:
        crop = crop[::-1]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop.astype(np.float32) * np.float32(sigma / 32.0)


def _light_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Illumination factor (float32 (h, w), <= 1): a linear gradient and sometimes a soft
    shadow edge. Computed on a coarse grid and upsampled."""
    gh, gw = max(2, h // 8), max(2, w // 8)
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    yy *= h / gh
    xx *= w / gw
    th = rng.uniform(0, 2 * math.pi)
    proj = xx * math.cos(th) + yy * math.sin(th)
    proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    light = 1.0 - rng.uniform(0.0, 0.2) * proj
    if rng.random() < 0.3:
        th2 = rng.uniform(0, 2 * math.pi)
        d = (xx - rng.uniform(0, w)) * math.cos(th2) + (yy - rng.uniform(0, h)) * math.sin(th2)
        light *= 1.0 - rng.uniform(0.12, 0.3) / (1.0 + np.exp(-d / rng.uniform(10, 80)))
    return cv2.resize(light.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def _make_paper(rng: np.random.Generator, ink_mask: np.ndarray) -> np.ndarray:
    """Paper texture + ink (BGR uint8) for the flat receipt."""
    h, w = ink_mask.shape
    base = float(rng.uniform(222, 250))
    warm = float(rng.uniform(0, 12))
    tint = (1.0 - warm / base, 1.0 - 0.4 * warm / base, 1.0)  # BGR, slightly yellow
    lum = _lowfreq(rng, h, w, int(rng.integers(3, 10)))
    lum *= np.float32(rng.uniform(1.5, 5.0))
    lum += _noise(rng, h, w, float(rng.uniform(1.0, 4.0)))
    lum += np.float32(base)
    if rng.random() < 0.3:  # a few faint fibres / specks
        spots = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(3, 25))):
            p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            q = (p[0] + int(rng.integers(-30, 31)), p[1] + int(rng.integers(-8, 9)))
            cv2.line(spots, p, q, int(rng.integers(20, 60)), 1, cv2.LINE_AA)
        lum = cv2.subtract(lum, spots.astype(np.float32))
    # ink: colour, strength, thermal-print dropouts
    ink_gray = rng.uniform(10, 60) if rng.random() < 0.85 else rng.uniform(60, 95)  # fresh / faded
    ink = (ink_gray + rng.uniform(0, 25), ink_gray + rng.uniform(-5, 5), ink_gray)
    alpha = ink_mask.astype(np.float32)
    alpha *= np.float32(rng.uniform(0.9, 1.0) / 255.0)
    if rng.random() < 0.4:
        drop = _lowfreq(rng, h, w, int(rng.integers(20, 60)))
        alpha *= np.clip(1.0 - rng.uniform(0.1, 0.35) * np.maximum(drop, 0), 0.4, 1.0)
    light = _light_map(rng, h, w)
    q = cv2.multiply(lum, 1.0 - alpha)
    q = cv2.multiply(q, light)
    a = cv2.multiply(alpha, light)
    chans = [cv2.addWeighted(q, float(tint[c]), a, float(ink[c]), 0.0, dtype=cv2.CV_8U) for c in range(3)]
    return cv2.merge(chans)


def _make_background(rng: np.random.Generator, h: int, w: int, shadow: np.ndarray | None) -> np.ndarray:
    """Table / surface behind the receipt (BGR uint8); ``shadow`` (float32 0..1) darkens it."""
    kind = rng.random()
    if kind < 0.4:  # wood-ish
        color = (rng.uniform(30, 70), rng.uniform(60, 100), rng.uniform(90, 150))
    elif kind < 0.75:  # grey table
        g = rng.uniform(45, 130)
        color = tuple(g + rng.uniform(-8, 8) for _ in range(3))
    else:  # coloured surface
        color = tuple(rng.uniform(25, 140) for _ in range(3))
    lum = _lowfreq(rng, h, w, int(rng.integers(2, 8)))
    lum *= np.float32(rng.uniform(0.04, 0.12))
    if kind < 0.4:  # grain stripes
        stripes = cv2.resize(rng.standard_normal((1, max(2, w // 6)), dtype=np.float32), (w, h),
                             interpolation=cv2.INTER_LINEAR)
        lum += stripes * np.float32(rng.uniform(0.04, 0.1))
    lum += _noise(rng, h, w, float(rng.uniform(0.01, 0.05)))
    lum += np.float32(1.0)
    lum = cv2.multiply(lum, _light_map(rng, h, w))
    if shadow is not None:
        lum = cv2.multiply(lum, 1.0 - np.float32(rng.uniform(0.3, 0.6)) * shadow)
    return cv2.merge([cv2.convertScaleAbs(lum, alpha=float(c)) for c in color])


def _smudge(rng: np.random.Generator, mask: np.ndarray, box: tuple[float, float, float, float]) -> None:
    """Make the word inside ``box`` unreadable (in place, on the ink mask)."""
    x0, y0, x1, y1 = box
    bh, bw = y1 - y0, x1 - x0
    ix0, iy0 = max(0, int(math.floor(x0))), max(0, int(math.floor(y0)))
    ix1, iy1 = min(mask.shape[1], int(math.ceil(x1))), min(mask.shape[0], int(math.ceil(y1)))
    if ix1 - ix0 < 2 or iy1 - iy0 < 2:
        return
    roi = mask[iy0:iy1, ix0:ix1]
    kind = rng.choice(["blot", "blur", "scribble", "smear"])
    if kind == "blot":
        cover = np.zeros(roi.shape, np.uint8)
        rh, rw = roi.shape
        n = max(1, int(math.ceil(rw / max(rh, 1))))
        for cx in np.linspace(0.5 * min(rh, rw), rw - 0.5 * min(rh, rw), n):
            c = (int(cx + rng.uniform(-0.1, 0.1) * rh), int(rng.uniform(0.45, 0.55) * rh))
            ax = (max(2, int(rng.uniform(0.7, 0.9) * min(rh, rw))), max(2, int(rng.uniform(0.55, 0.7) * rh)))
            cv2.ellipse(cover, c, ax, float(rng.uniform(-15, 15)), 0, 360, 255, -1, cv2.LINE_AA)
        cov = cv2.GaussianBlur(cover, (0, 0), max(0.8, bh * 0.06)).astype(np.float32) / 255.0
        # the blot replaces the letters under it (an ink blot of uniform darkness)
        value = float(rng.uniform(190, 255))
        roi[:] = np.clip(roi.astype(np.float32) * (1.0 - cov) + value * cov, 0, 255).astype(np.uint8)
    elif kind == "blur":
        s = max(2.0, bh * rng.uniform(0.35, 0.5))
        sm = cv2.GaussianBlur(roi.astype(np.float32), (0, 0), s) * rng.uniform(2.5, 3.5)
        roi[:] = np.clip(sm, 0, 255).astype(np.uint8)
    elif kind == "scribble":
        n = max(6, int(bw / bh * rng.uniform(3.0, 5.0)))
        xs = np.linspace(0, roi.shape[1] - 1, n)
        ys = np.where(np.arange(n) % 2 == 0, rng.uniform(0.05, 0.3, n), rng.uniform(0.7, 0.95, n)) * (roi.shape[0] - 1)
        pts = np.stack([xs, ys], 1).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(roi, [pts], False, 255, max(2, int(bh * rng.uniform(0.12, 0.22))), cv2.LINE_AA)
        pts2 = pts.copy()
        pts2[:, 0, 1] = roi.shape[0] - 1 - pts2[:, 0, 1]
        cv2.polylines(roi, [pts2], False, 255, max(2, int(bh * rng.uniform(0.1, 0.2))), cv2.LINE_AA)
    else:  # smear: strong horizontal motion blur + fill
        k = max(3, int(bw * rng.uniform(0.4, 0.7)) | 1)
        kern = np.full((1, k), 1.0 / k, np.float32)
        sm = cv2.filter2D(roi.astype(np.float32), -1, kern, borderType=cv2.BORDER_REPLICATE)
        sm = cv2.GaussianBlur(sm, (0, 0), max(1.5, bh * 0.15)) * rng.uniform(2.5, 4.0)
        roi[:] = np.clip(sm, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- rendering


def _layout(rng: np.random.Generator, paper: _Paper, content_top: int, content_bottom: int,
            body: _Style, title_case: bool) -> int:
    """Choose the receipt text, fit it to the paper and draw it. Returns the y below the last
    line."""
    left, right = paper.left, paper.right
    avail = right - left
    spacing = float(rng.uniform(1.3, 1.7))
    sep_pitch = max(6, int(round(body.box_h * rng.uniform(0.7, 1.0))))
    bold = body.bolder(rng)
    # header font: another style (or the body one), larger, often bold
    head = _pick_style(rng, heading=True) if rng.random() < 0.6 else body
    head = _fit_box_h(head, body.box_h * float(rng.uniform(1.1, 1.6)), rng)
    if rng.random() < 0.5:
        head = head.bolder(rng)
    total_style = bold if rng.random() < 0.6 else body

    def pitch(st: _Style) -> int:
        return int(math.ceil(st.box_h * spacing))

    def gap_of(st: _Style) -> int:
        return max(st.space * 2, int(avail * 0.04))

    def split_lr(ln: _Line) -> list[_Line]:
        """A label/value line too wide for the paper becomes two lines."""
        st = ln.style
        if (ln.kind != "lr" or ln.mid is not None or not ln.left or not ln.right or st is None
                or st.text_width(ln.left) + gap_of(st) + st.text_width(ln.right) <= avail):
            return [ln]
        return [_Line("lr", left=ln.left, style=st), _Line("lr", right=ln.right, style=st)]

    capacity = content_bottom - content_top
    # rough item budget: everything else takes ~ header + totals lines
    est_lines = capacity // pitch(body)
    max_items = int(np.clip(est_lines - 10, 2, 12))
    c = _build_content(rng, max_items, title_case)

    sep_before_items = rng.random() < 0.85
    shop = c["shop"]
    if head.text_width(shop) > avail:
        head = bold if bold.text_width(shop) <= avail else body
    gap_after_shop = rng.random() < 0.3
    sep_items = _sep_line(rng) if sep_before_items else None

    def make_head(n_header: int) -> list[_Line]:
        lines = [_Line("center", left=shop, style=head)]
        if gap_after_shop:
            lines.append(_Line("gap"))
        lines += [_Line("center", left=h, style=body) for h in c["header"][:n_header]]
        for a, b in c["meta"]:
            lines += split_lr(_Line("lr", left=a, right=b, style=body))
        if sep_items is not None:
            lines.append(sep_items)
        return lines

    two_line_items = rng.random() < 0.25
    item_lines: list[list[_Line]] = []
    amounts: list[float] = []
    for name, mid, amount, value in c["items"]:
        amounts.append(value)
        if two_line_items and mid is not None:
            item_lines.append([_Line("lr", left=name, style=body),
                               _Line("lr", left="", mid=mid, right=amount, style=body)])
        else:
            item_lines.append([_Line("lr", left=name, mid=mid, right=amount, style=body)])
    indent = float(rng.choice([0.0, 0.0, 0.35, 0.45]))
    sep_totals = _sep_line(rng)
    sep_pay = _sep_line(rng) if rng.random() < 0.5 else None
    sep_footer = _sep_line(rng) if rng.random() < 0.6 else _Line("gap")

    def make_tail(n_items: int, with_pay: bool, n_footer: int) -> list[_Line]:
        totals, pay = c["summary"](amounts[:n_items])
        tail: list[_Line] = [sep_totals]
        for i, (a, b) in enumerate(totals):
            st = total_style if i == len(totals) - 1 else body
            tail += split_lr(_Line("lr", left=a, right=b, style=st, label_indent=indent))
        if pay and with_pay:
            if sep_pay is not None:
                tail.append(sep_pay)
            for a, b in pay:
                tail += split_lr(_Line("lr", left=a, right=b, style=body, label_indent=indent))
        if n_footer:
            tail.append(sep_footer)
            tail += [_Line("center", left=f, style=body) for f in c["footer"][:n_footer]]
        return tail

    def height(ls: list[_Line]) -> int:
        return sum(sep_pitch if ln.kind in ("sep", "gap") else pitch(ln.style) for ln in ls)

    def n_words(ls: list[_Line]) -> int:
        return sum(len(ln.left.split()) + len((ln.mid or "").split()) + len(ln.right.split()) for ln in ls)

    # shrink until the receipt fits the paper and has at most max_words words: items first
    # (down to 4), then optional header / payment / footer lines, then items down to 1.
    # Totals are always recomputed from the items that remain.
    max_words = int(rng.integers(28, 47))
    n_items, n_header, with_pay, n_footer = len(item_lines), len(c["header"]), True, len(c["footer"])

    def assemble() -> list[_Line]:
        items = [ln for grp in item_lines[:n_items] for ln in grp]
        return make_head(n_header) + items + make_tail(n_items, with_pay, n_footer)

    all_lines = assemble()
    while height(all_lines) > capacity or n_words(all_lines) > max_words:
        if n_items > 4:
            n_items -= 1
        elif n_header > 0:
            n_header -= 1
        elif with_pay:
            with_pay = False
        elif n_footer > 1:
            n_footer -= 1
        elif n_items > 1:
            n_items -= 1
        else:
            break
        all_lines = assemble()
    while height(all_lines) > capacity and len(all_lines) > 1:  # last resort, not reached here
        all_lines.pop()
    # spread spare room a bit (receipts rarely have all text crammed at the top)
    spare = capacity - height(all_lines)
    extra = 0
    if spare > 0 and len(all_lines) > 1:
        extra = int(min(spare * rng.uniform(0.0, 0.5) / len(all_lines), body.box_h * rng.uniform(0.0, 0.3)))

    amount_col = body.width("0000.00")
    y = content_top
    for ln in all_lines:
        if ln.kind == "gap":
            y += sep_pitch + extra
            continue
        if ln.kind == "sep":
            _draw_separator(rng, paper, ln.left, y, sep_pitch, body)
            y += sep_pitch + extra
            continue
        st = ln.style
        assert st is not None
        lh = st.box_h
        if ln.kind == "center":
            text = _truncate(ln.left, st, avail)
            w = st.text_width(text)
            jitter = int(rng.integers(-3, 4))
            x = left + max(0, (avail - w) // 2 + jitter)
            x = min(x, right - w)
            paper.draw_text(text, x, y, st, lh)
        else:  # "lr"
            right_text = ln.right
            wr = st.text_width(right_text)
            gap = gap_of(st)
            lx = left + int(avail * ln.label_indent)
            if lx + st.text_width(ln.left) + gap + wr > right:
                lx = left
            mid = ln.mid
            if mid is not None:
                wm = st.text_width(mid)
                mid_right = right - max(amount_col, wr) - gap
                mid_x = mid_right - wm
                if mid_x < lx + st.text_width(ln.left) + gap:
                    # not enough room on one line: shorten the name, else drop the quantity
                    if mid_x - gap - lx >= st.width("WWWWW"):
                        left_text = _truncate(ln.left, st, mid_x - gap - lx)
                    else:
                        mid, left_text = None, ln.left
                else:
                    left_text = ln.left
            else:
                left_text = ln.left
            max_left = right - lx - (wr + gap if right_text else 0)
            left_text = _truncate(left_text, st, max_left) if left_text else ""
            if left_text:
                paper.draw_text(left_text, lx, y, st, lh)
            if mid is not None:
                paper.draw_text(mid, right - max(amount_col, wr) - gap - st.text_width(mid), y, st, lh)
            if right_text:
                paper.draw_text(right_text, right - wr, y, st, lh)
        y += pitch(st) + extra
    return y - extra


def _draw_separator(rng: np.random.Generator, paper: _Paper, kind: str, y: int, pitch: int, body: _Style) -> None:
    """Draw an (unannotated) separator row centred in [y, y + pitch) and record its ink box."""
    left, right = paper.left, paper.right
    sh = 3 * max(pitch, body.box_h) + 8
    strip = np.zeros((sh, paper.w), np.uint8)
    cy = sh // 2
    t = max(1, int(round(body.box_h * rng.uniform(0.03, 0.07))))
    if kind.startswith("text"):
        ch = kind[-1]
        n = max(1, (right - left) // max(1, body.width(ch * 10) // 10))
        s = ch * n
        while len(s) > 1 and body.width(s) > right - left:
            s = s[:-1]
        body.draw(strip, s, left, cy)
    elif kind == "dash":
        dash, gap = int(rng.integers(6, 16)), int(rng.integers(4, 10))
        for x in range(left, right - dash + 1, dash + gap):
            cv2.line(strip, (x, cy), (x + dash, cy), 255, t, cv2.LINE_AA)
    elif kind == "dots":
        step = int(rng.integers(6, 12))
        for x in range(left + 2, right - 2, step):
            cv2.circle(strip, (x, cy), max(1, t), 255, -1, cv2.LINE_AA)
    else:  # solid
        cv2.line(strip, (left, cy), (right, cy), 255, t, cv2.LINE_AA)
    rows = np.flatnonzero(strip.any(axis=1))
    if rows.size == 0:
        return
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    dst0 = y + (pitch - (r1 - r0)) // 2  # paper row of strip row r0
    lo, hi = max(0, dst0), min(paper.h, dst0 + (r1 - r0))
    if hi <= lo:
        return
    src = strip[r0 + (lo - dst0):r0 + (hi - dst0)]
    np.maximum(paper.mask[lo:hi], src, out=paper.mask[lo:hi])
    cols = np.flatnonzero(src.any(axis=0))
    paper.seps.append((float(cols[0]) - 1.0, float(lo) - 1.0, float(cols[-1]) + 2.0, float(hi) + 1.0))


def _box_corners(box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)  # TL, TR, BR, BL


def _apply_h(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a homography to continuous (N, 2) points."""
    p = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ m.T
    return p[:, :2] / p[:, 2:3]


def _warp(img: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp ``img`` by the homography ``m`` given in continuous pixel coordinates (pixel (i, j)
    covers [j, j+1) x [i, i+1)); cv2 works on pixel-centre indices (index p <-> continuous
    p + 0.5), so conjugate by that half-pixel shift."""
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    m_idx = np.linalg.inv(shift) @ m @ shift
    return cv2.warpPerspective(img, m_idx, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _min_side(quad: np.ndarray) -> float:
    """Shorter side of a quadrilateral: min over the two pairs of opposite edges, using the
    shorter edge of each pair."""
    e = np.linalg.norm(np.roll(quad, -1, axis=0) - quad, axis=1)
    return float(min(min(e[0], e[2]), min(e[1], e[3])))


def _render_full(rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """render_receipt plus extras for tests: {"paper": quad, "separators": [quad, ...]}."""
    W = int(rng.integers(500, 801))
    aspect = float(rng.uniform(1.25, 2.1))
    H = int(min(round(W * aspect), 1400))
    long_side = max(W, H)
    px_per_512 = long_side / TARGET_LONG_SIDE
    on_table = bool(rng.random() < 0.35)

    if on_table:
        pw = int(W * rng.uniform(0.74, 0.92))
        ph = int(H * rng.uniform(0.82, 0.96))
        bleed_x = bleed_y = 0
    else:
        bleed_x, bleed_y = int(0.03 * W), int(0.02 * H)
        pw, ph = W + 2 * bleed_x, H + 2 * bleed_y
    mx = bleed_x + int(pw * rng.uniform(0.045, 0.09))
    my0 = bleed_y + int(ph * rng.uniform(0.025, 0.05))
    my1 = bleed_y + int(ph * rng.uniform(0.02, 0.05))
    paper = _Paper(pw, ph, mx, pw - mx)

    # body text: box height (at 512) in [13, 17]; narrower receipts get smaller text
    u = float(rng.uniform(13.0, 17.0 - 2.0 * (aspect - 1.25) / 0.85))
    body = _fit_box_h(_pick_style(rng, heading=False), u * px_per_512, rng)
    title_case = bool(rng.random() < 0.2)
    used = _layout(rng, paper, my0, ph - my1, body, title_case)

    # trim unused paper at the bottom (the image gets shorter: text only grows relative to it)
    need_ph = used + my1 + int(ph * rng.uniform(0.0, 0.06))
    h_min = int(math.ceil(1.2 * W)) + 1
    if need_ph < ph:
        if on_table:
            new_ph = need_ph
            new_h = max(h_min, min(H, int(round(new_ph / rng.uniform(0.82, 0.96)))))
        else:
            new_h = max(h_min, min(H, need_ph - 2 * bleed_y))
            new_ph = new_h + 2 * bleed_y
        paper.crop(new_ph)
        ph, H = new_ph, new_h
        px_per_512 = max(W, H) / TARGET_LONG_SIDE

    # smudged, unreadable words
    n_smudge = int(rng.choice([0, 1, 1, 2, 2, 3])) if paper.words else 0
    ignore = np.zeros(len(paper.words), bool)
    if n_smudge:
        for i in rng.choice(len(paper.words), size=min(n_smudge, len(paper.words)), replace=False):
            _smudge(rng, paper.mask, paper.words[int(i)]["box"])
            ignore[int(i)] = True

    paper_u8 = _make_paper(rng, paper.mask)

    # paper -> image homography: rotation + mild perspective (+ placement on the table)
    angle = float(rng.uniform(-3.0, 3.0)) if on_table else float(rng.uniform(-2.5, 2.5))
    jit = rng.uniform(-1.0, 1.0, (4, 2)) * 0.012 * min(W, H)
    if on_table:
        cx = W / 2 + rng.uniform(-0.5, 0.5) * (W - pw) * 0.8
        cy = H / 2 + rng.uniform(-0.5, 0.5) * (H - ph) * 0.8
    else:
        cx, cy = W / 2 + rng.uniform(-0.01, 0.01) * W, H / 2 + rng.uniform(-0.01, 0.01) * H
    src = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float64)
    boxes = [_box_corners(wd["box"]) for wd in paper.words]
    quads: list[np.ndarray] = []
    m = np.eye(3)
    for attempt in range(5):
        amp = 0.5 ** attempt if attempt < 4 else 0.0
        a = math.radians(angle * amp)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        dst = (src - [pw / 2, ph / 2]) @ rot.T + [cx, cy] + jit * amp
        if attempt == 4:
            dst = src - [pw / 2, ph / 2] + [W / 2, H / 2]
        m = cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32)).astype(np.float64)
        quads = [_apply_h(m, b) for b in boxes]
        inside = all(q[:, 0].min() >= 0.5 and q[:, 1].min() >= 0.5 and q[:, 0].max() <= W - 0.5
                     and q[:, 1].max() <= H - 0.5 for q in quads)
        big = all(_min_side(q) / px_per_512 >= _MIN_SIDE_RENDER for q, ig in zip(quads, ignore) if not ig)
        if inside and big:
            break

    warped = _warp(paper_u8, m, (W, H))
    paper_quad = _apply_h(m, src)
    pmask = np.zeros((H, W), np.uint8)
    cv2.fillConvexPoly(pmask, np.round((paper_quad - 0.5) * 16).astype(np.int32), 255, cv2.LINE_AA, 4)
    shadow = None
    if on_table:  # soft shadow of the paper on the table (computed at 1/4 resolution)
        sw, sh_ = max(2, W // 4), max(2, H // 4)
        small = cv2.resize(pmask, (sw, sh_), interpolation=cv2.INTER_AREA)
        off = rng.uniform(0.5, 2.5, 2)
        small = cv2.warpAffine(small, np.float32([[1, 0, off[0]], [0, 1, off[1]]]), (sw, sh_))
        small = cv2.GaussianBlur(small, (0, 0), float(rng.uniform(1.0, 2.5)))
        shadow = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    bg = _make_background(rng, H, W, shadow)
    pm = pmask.astype(np.float32) / 255.0
    out = cv2.blendLinear(warped, bg, pm, 1.0 - pm)
    r = rng.random()
    if r < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.5, 1.1)))
    elif r < 0.38:  # slight camera shake
        k = int(rng.integers(3, 6))
        kern = np.zeros((k, k), np.float32)
        cv2.line(kern, (0, int(rng.integers(0, k))), (k - 1, int(rng.integers(0, k))), 1.0, 1)
        out = cv2.filter2D(out, -1, kern / kern.sum())

    words = []
    for q, wd, ig in zip(quads, paper.words, ignore):
        q = np.clip(q, [0.0, 0.0], [float(W), float(H)])
        words.append({"points": [[round(float(x), 2), round(float(y), 2)] for x, y in q],
                      "transcription": DONT_CARE if ig else wd["text"]})
    extras = {"paper": paper_quad, "separators": [_apply_h(m, _box_corners(s)) for s in paper.seps],
              "on_table": on_table}
    return out, words, extras


def render_receipt(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One receipt: (BGR uint8 image HxWx3, words) where words is a list of
    {"points": [[x, y]*4], "transcription": str} in image pixels (clockwise from the
    top-left of the unrotated word; "###" = smudged / unreadable)."""
    img, words, _ = _render_full(rng)
    return img, words


# --------------------------------------------------------------------------- dataset files


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])


def _image_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.jpg"


def _marker_payload(seed: int, counts: dict[str, int]) -> dict[str, Any]:
    return {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "seed": int(seed),
            "counts": {s: int(counts[s]) for s in SPLITS},
            "num_train": int(counts["train"]), "num_val": int(counts["val"]), "num_test": int(counts["test"])}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=False) + "\n").encode("utf-8")


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return contextlib.nullcontext(None)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with lightning
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive inter-process lock for ``root`` (a sibling lock file, kept afterwards)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a directory that is not a dataset written by this module."""
    if not root.exists():
        return
    if not root.is_dir():
        raise RuntimeError(f"{root} exists and is not a directory; refusing to replace it")
    marker = _read_marker(root)
    if marker is not None and marker.get("generator") == GENERATOR_NAME:
        return
    if not any(root.iterdir()):
        return
    raise RuntimeError(
        f"{root} exists but is not a synthetic receipt dataset written by ocr.data.synthetic "
        f"(no {_MARKER} with generator={GENERATOR_NAME!r}); refusing to overwrite it. "
        f"Delete or move it, or choose another root."
    )


def _cleanup_stale(root: Path) -> None:
    """Remove temporary / trash siblings left by interrupted runs (call with the lock held)."""
    for p in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.parent.glob(f".{root.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _generate_unlocked(root: Path, counts: dict[str, int], seed: int, progress: bool) -> Path:
    _check_replaceable(root)
    _cleanup_stale(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / "jsons").mkdir(parents=True)
        total = sum(counts.values())
        with _progress(total, progress, f"synthetic receipts -> {root}") as bar:
            for split in SPLITS:
                img_dir = tmp / "images" / split
                img_dir.mkdir(parents=True)
                images: dict[str, Any] = {}
                for i in range(counts[split]):
                    rng = _image_rng(seed, split, i)
                    img, words = render_receipt(rng)
                    quality = int(rng.integers(60, 96))
                    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
                    if not ok:
                        raise RuntimeError(f"cv2.imencode failed for {split} image {i}")
                    name = _image_name(split, i)
                    (img_dir / name).write_bytes(buf.tobytes())
                    images[name] = {"words": {f"{k + 1:04d}": w for k, w in enumerate(words)}}
                    if bar is not None:
                        bar.update(1)
                (tmp / "jsons" / f"{split}.json").write_bytes(_json_bytes({"images": images}))
        # the marker goes in last: a directory without it is never taken for a complete dataset
        (tmp / _MARKER).write_bytes(_json_bytes(_marker_payload(seed, counts)))
        if root.exists():
            trash = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, trash)
            os.rename(tmp, root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _counts(num_train: int, num_val: int, num_test: int) -> dict[str, int]:
    counts = {"train": int(num_train), "val": int(num_val), "test": int(num_test)}
    for k, v in counts.items():
        if v < 0:
            raise ValueError(f"num_{k} must be >= 0, got {v}")
    return counts


def generate_dataset(root: str | Path, num_train: int = 200, num_val: int = 40, num_test: int = 40,
                     seed: int = 0, progress: bool = True) -> Path:
    """Write the full dataset under ``root`` (replacing a previous synthetic dataset there).

    Deterministic: the same (counts, seed) give byte-identical files; every image comes from
    its own RNG seeded with (seed, split, index). Atomic: built in a temporary sibling
    directory, then renamed into place. ``<root>/DATASET.json`` records generator, version,
    seed and counts. Refuses to overwrite a non-empty directory it did not write."""
    root = Path(root).absolute()
    counts = _counts(num_train, num_val, num_test)
    with _locked(root):
        return _generate_unlocked(root, counts, int(seed), progress)


def _why_stale(root: Path, counts: dict[str, int], seed: int) -> str | None:
    """None if ``root`` holds the complete dataset for (counts, seed), else the reason."""
    if not root.exists():
        return "it does not exist"
    marker = _read_marker(root)
    if marker is None:
        return f"{_MARKER} is missing or unreadable"
    if marker.get("generator") != GENERATOR_NAME:
        return f"{_MARKER} names generator {marker.get('generator')!r}"
    if marker.get("version") != GENERATOR_VERSION:
        return f"generator version {marker.get('version')!r} != {GENERATOR_VERSION}"
    if marker.get("seed") != seed:
        return f"seed {marker.get('seed')!r} != {seed}"
    have = marker.get("counts")
    if have != counts:
        return f"counts {have!r} != {counts!r}"
    for split in SPLITS:
        if not (root / "jsons" / f"{split}.json").is_file():
            return f"jsons/{split}.json is missing"
        img_dir = root / "images" / split
        n = sum(1 for _ in img_dir.glob("*.jpg")) if img_dir.is_dir() else 0
        if n != counts[split]:
            return f"images/{split} has {n} images, expected {counts[split]}"
    return None


def ensure_dataset(root: str | Path, num_train: int = 200, num_val: int = 40, num_test: int = 40,
                   seed: int = 0, progress: bool = True) -> Path:
    """Generate the dataset under ``root`` unless a complete one for (counts, seed) and the
    current :data:`GENERATOR_VERSION` is already there (the reason for regenerating is logged).
    Safe to call from several processes at once (``fcntl.flock`` on a sibling lock file).

    A non-empty ``root`` without ``DATASET.json`` was not written by this module (writes are
    atomic): it is moved aside to ``<root>.orphaned-<n>`` (with a warning), never deleted."""
    root_in = root
    root = Path(root).absolute()
    counts = _counts(num_train, num_val, num_test)
    seed = int(seed)
    why = _why_stale(root, counts, seed)
    if why is None:
        return Path(root_in)
    with _locked(root):
        why = _why_stale(root, counts, seed)  # another process may have just built it
        if why is None:
            return Path(root_in)
        if root.exists() and root.is_dir() and any(root.iterdir()):
            marker = _read_marker(root)
            if marker is None:
                n = 0
                while (aside := root.parent / f"{root.name}.orphaned-{n}").exists():
                    n += 1
                log.warning("%s has no %s: not a dataset written by ocr.data.synthetic; moving it to %s",
                            root, _MARKER, aside)
                os.rename(root, aside)
        log.log(logging.WARNING if root.exists() else logging.INFO,
                "generating synthetic receipt dataset at %s (train=%d val=%d test=%d seed=%d): %s",
                root, counts["train"], counts["val"], counts["test"], seed, why)
        _generate_unlocked(root, counts, seed, progress)
    return Path(root_in)
