"""A small synthetic multi-domain few-shot benchmark in the converted-shard format.

Seven sources, each a different *kind* of image, generated from ``(seed, source, class, i)``
only, so a build is deterministic and byte-identical for a seed. Classes are defined by a few
visual factors (shape, colour, stroke set, pattern, layout...) and every image jitters them
(position, scale, rotation, colour, stroke noise, background clutter, pixel noise), so one
image does not pin a class down but a few do.

=================  =======  ==========================================  =============  ==========  ======
source             role     kind                                        spec           classes     images
                                                                                       tr/va/te    /class
=================  =======  ==========================================  =============  ==========  ======
``objects``        ID       coloured shapes with fills on cluttered     Hierarchical   80/20/20    16-40
                            backgrounds (ImageNet-like DAG: kind >
                            kind+fill > hue leaves), 40 px JPEG
``glyphs``         ID       handwritten-like characters; alphabets      BiLevel        alphabets   20
                            share stroke primitives (Omniglot-like),    (alphabets)    8/3/5
                            36 px PNG                                                  (6-16 chars)
``textures``       ID       procedural textures: stripes, checks,       flat           24/6/6      40
                            dots, waves, plaid, blobs (DTD-like), 48 px
``doodles``        ID       smooth one/two-stroke sketches with heavy   flat           40/10/10    30-60
                            deformation (QuickDraw-like), 28 px PNG
``signs``          OOD      sign plates: border shape/colour + symbol   flat (test)    0/0/24      20-50
                            on street-like backgrounds (GTSRB-like),
                            32-48 px JPEG
``digits``         OOD      white-on-black font digits with affine      flat (test)    0/0/10      60
                            jitter and stroke width (MNIST-like), 28 px
``patterns``       OOD      colour layouts (bands, quadrants, rings,    flat (test)    0/0/30      30
                            ...) x 3-colour palettes, 32 px JPEG
=================  =======  ==========================================  =============  ==========  ======

``--scale`` multiplies the number of classes (hues per group, alphabets, flat classes);
``scale=1`` is about 13k images and builds in well under a minute on 2 cores.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from smat_dist.data.spec import SPLITS, GraphNode, SourceSpec, bilevel_spec, flat_spec, hierarchical_spec
from smat_dist.data.writer import ClassEntry, InputSource, WriteOptions, build_sources

ID_SOURCES = ("objects", "glyphs", "textures", "doodles")
OOD_SOURCES = ("signs", "digits", "patterns")
ALL_SOURCES = ID_SOURCES + OOD_SOURCES
_KIND_ID = {k: i for i, k in enumerate(ALL_SOURCES)}


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def _hsv(h: float, s: float, v: float) -> Tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))
    return int(r * 255), int(g * 255), int(b * 255)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=92)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _chaikin(pts: np.ndarray, rounds: int = 2) -> np.ndarray:
    for _ in range(rounds):
        a, b = pts[:-1], pts[1:]
        mid = np.empty((2 * len(a), 2))
        mid[0::2] = 0.75 * a + 0.25 * b
        mid[1::2] = 0.25 * a + 0.75 * b
        pts = np.vstack([pts[:1], mid, pts[-1:]])
    return pts


def _affine(pts: np.ndarray, rot: float, scale: float, shift: np.ndarray, centre=(0.5, 0.5)) -> np.ndarray:
    c, s = math.cos(rot), math.sin(rot)
    m = np.array([[c, -s], [s, c]]) * scale
    return (pts - centre) @ m.T + centre + shift


@lru_cache(maxsize=8)
def _grid(R: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:R, 0:R].astype(np.float32)
    return yy, xx


def _noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)


def _background(rng: np.random.Generator, R: int, sat: float = 0.25, clutter: int = 3) -> Image.Image:
    h1, h2 = rng.random(2)
    c1 = np.array(_hsv(h1, sat * rng.random(), 0.35 + 0.6 * rng.random()), dtype=np.float32)
    c2 = np.array(_hsv(h2, sat * rng.random(), 0.35 + 0.6 * rng.random()), dtype=np.float32)
    ang = rng.random() * 2 * math.pi
    yy, xx = _grid(R)
    t = np.clip(0.5 + (xx / R - 0.5) * math.cos(ang) + (yy / R - 0.5) * math.sin(ang), 0, 1)[..., None]
    arr = c1 * (1 - t) + c2 * t + _noise(rng, (R, R, 3), 8)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, clutter + 1))):
        cx, cy = rng.random(2) * R
        r = R * (0.05 + 0.12 * rng.random())
        d.ellipse([cx - r, cy - r * (0.5 + rng.random()), cx + r, cy + r], fill=_hsv(rng.random(), 0.5 * rng.random(), 0.3 + 0.6 * rng.random()))
    return img


# ---------------------------------------------------------------- class layouts


@dataclass
class _Layout:
    spec: SourceSpec
    protos: Dict[int, dict]
    counts: Dict[int, int]
    entries: List[ClassEntry] = field(default_factory=list)


SHAPES = ("triangle", "square", "pentagon", "hexagon", "circle", "star", "cross", "ring")
FILLS = ("solid", "stripes", "dots")


def _scaled(n: int, scale: float, lo: int) -> int:
    return max(lo, int(round(n * scale)))


def _layout_objects(seed: int, scale: float) -> _Layout:
    rng = _rng(seed, 100)
    hues = _scaled(5, scale, 5)
    groups = [(k, f) for k in SHAPES for f in FILLS]
    perm = rng.permutation(len(groups))
    n_va, n_te = 4, 4
    split_of_group = {}
    for rank, gi in enumerate(perm):
        split_of_group[groups[gi]] = "valid" if rank < n_va else "test" if rank < n_va + n_te else "train"
    leaves = {s: [] for s in SPLITS}
    protos_by_wn = {}
    for k in SHAPES:
        for f in FILLS:
            base = rng.random()
            spread = 0.6
            for hi in range(hues):
                wn = f"n_{k}_{f}_h{hi}"
                protos_by_wn[wn] = {
                    "shape": k, "fill": f, "hue": (base + spread * hi / hues) % 1.0,
                    "sat": 0.6 + 0.3 * rng.random(), "val": 0.55 + 0.4 * rng.random(),
                    "hue2": rng.random(), "rot": rng.random() * 2 * math.pi,
                    "stripe": rng.random() * math.pi, "size": 0.85 + 0.3 * rng.random(),
                }
                leaves[split_of_group[(k, f)]].append(wn)
    graph = {}
    class_names = {}
    cid = 0
    for s in SPLITS:
        for wn in sorted(leaves[s]):
            class_names[cid] = wn
            cid += 1
        kinds = sorted({protos_by_wn[w]["shape"] for w in leaves[s]})
        nodes = [GraphNode("n_root", "object", [f"n_{k}" for k in kinds], [])]
        for k in kinds:
            fills = sorted({protos_by_wn[w]["fill"] for w in leaves[s] if protos_by_wn[w]["shape"] == k})
            nodes.append(GraphNode(f"n_{k}", k, [f"n_{k}_{f}" for f in fills], ["n_root"]))
            for f in fills:
                kids = sorted(w for w in leaves[s] if w.startswith(f"n_{k}_{f}_"))
                nodes.append(GraphNode(f"n_{k}_{f}", f"{k} {f}", kids, [f"n_{k}"]))
                nodes.extend(GraphNode(w, w[2:].replace("_", " "), [], [f"n_{k}_{f}"]) for w in kids)
        graph[s] = nodes
    counts = {c: int(rng.integers(16, 41)) for c in class_names}
    spec = hierarchical_spec("objects", graph, counts, class_names)
    protos = {c: protos_by_wn[w] for c, w in class_names.items()}
    return _Layout(spec, protos, counts)


def _layout_glyphs(seed: int, scale: float) -> _Layout:
    rng = _rng(seed, 200)
    per_split = {"train": _scaled(8, scale, 2), "valid": _scaled(3, scale, 1), "test": _scaled(5, scale, 1)}
    n_alpha = sum(per_split.values())
    sizes, protos, names, alpha_names = [], {}, {}, []
    cid = 0
    for a in range(n_alpha):
        curvy = bool(rng.random() < 0.5)
        prims = []
        for _ in range(6):
            n = int(rng.integers(3, 5))
            p = [rng.random(2) * 0.6 + 0.2]
            ang = rng.random() * 2 * math.pi
            for _ in range(n - 1):
                ang += rng.normal(0, 0.9 if curvy else 1.6)
                p.append(np.clip(p[-1] + 0.35 * np.array([math.cos(ang), math.sin(ang)]), 0.05, 0.95))
            prims.append(np.array(p))
        width = 2.5 + 2.0 * rng.random()
        n_chars = int(rng.integers(6, 17))
        sizes.append(n_chars)
        alpha_names.append(f"alphabet_{a:02d}")
        for ch in range(n_chars):
            parts = []
            for _ in range(int(rng.integers(2, 5))):
                parts.append({"prim": int(rng.integers(6)), "off": (rng.integers(-1, 2, 2) * 0.22).tolist(),
                              "scale": 0.5 + 0.35 * rng.random(), "rot": rng.normal(0, 0.5)})
            protos[cid] = {"prims": prims, "parts": parts, "curvy": curvy, "width": width}
            names[cid] = f"alphabet_{a:02d}_char_{ch:02d}"
            cid += 1
    counts = {c: 20 for c in names}
    spec = bilevel_spec("glyphs", per_split, sizes, alpha_names, counts, names)
    return _Layout(spec, protos, counts)


TEXTURES = ("stripes", "checks", "dots", "waves", "plaid", "blobs")


def _flat_layout(name: str, seed: int, per_split: Dict[str, int], make, count_range: Tuple[int, int]) -> _Layout:
    rng = _rng(seed, 300 + _KIND_ID[name])
    n = sum(per_split.values())
    protos = {c: {**make(rng, c), "seed": seed} for c in range(n)}
    names = {c: f"{name}_{c:03d}" for c in range(n)}
    counts = {c: int(rng.integers(count_range[0], count_range[1] + 1)) for c in range(n)}
    return _Layout(flat_spec(name, per_split, counts, names), protos, counts)


TEXTURE_PALETTES = 4  # few palettes shared by many classes: colour alone does not name a texture


def _make_texture(rng, c):
    return {"type": TEXTURES[c % len(TEXTURES)], "freq": 2.0 + 5.0 * rng.random(), "theta": rng.random() * math.pi,
            "palette": int(rng.integers(TEXTURE_PALETTES)), "sharp": 1.0 + 6.0 * rng.random(),
            "freq2": 2.0 + 5.0 * rng.random(), "amp": 1.0 + 2.0 * rng.random()}


@lru_cache(maxsize=8)
def _texture_palettes(seed: int) -> List[Tuple[Tuple[float, float, float], Tuple[float, float, float]]]:
    rng = _rng(seed, 399)
    return [((rng.random(), 0.3 + 0.6 * rng.random(), 0.2 + 0.4 * rng.random()),
             (rng.random(), 0.3 + 0.6 * rng.random(), 0.6 + 0.4 * rng.random())) for _ in range(TEXTURE_PALETTES)]


def _make_doodle(rng, c):
    strokes = []
    for _ in range(int(rng.integers(1, 3))):
        p = [rng.random(2) * 0.5 + 0.25]
        ang = rng.random() * 2 * math.pi
        for _ in range(int(rng.integers(5, 9))):
            ang += rng.normal(0, 1.0)
            p.append(np.clip(p[-1] + 0.18 * np.array([math.cos(ang), math.sin(ang)]), 0.08, 0.92))
        strokes.append(np.array(p))
    return {"strokes": strokes}


SIGN_SHAPES = ("circle", "triangle", "down", "octagon", "diamond", "square")
SIGN_SYMBOLS = "0123456789ABCDEFGHKLMNPRSTUVXYZ<>^"


def _make_sign(rng, c):
    return {"shape": SIGN_SHAPES[int(rng.integers(len(SIGN_SHAPES)))],
            "border": [(200, 20, 20), (20, 60, 190), (20, 20, 20), (230, 180, 0)][int(rng.integers(4))],
            "plate": [(245, 245, 245), (250, 215, 40), (30, 90, 200)][int(rng.integers(3))],
            "symbol": SIGN_SYMBOLS[int(rng.integers(len(SIGN_SYMBOLS)))]}


PATTERN_LAYOUTS = ("quadrants", "hbands", "vbands", "rings", "diagonal", "blob")


def _make_pattern(rng, c):
    # A class is a layout plus hue *relations* and a light/dark order; the base hue is drawn per
    # image, so raw colour does not identify a class.
    return {"layout": PATTERN_LAYOUTS[c % len(PATTERN_LAYOUTS)],
            "hues": [0.0, 0.15 + 0.35 * rng.random(), 0.5 + 0.35 * rng.random()],
            "sats": (0.4 + 0.6 * rng.random(3)).tolist(), "vals": (0.3 + 0.7 * rng.random(3)).tolist()}


@lru_cache(maxsize=16)
def layout(kind: str, seed: int, scale: float) -> _Layout:
    if kind == "objects":
        lay = _layout_objects(seed, scale)
    elif kind == "glyphs":
        lay = _layout_glyphs(seed, scale)
    elif kind == "textures":
        lay = _flat_layout(kind, seed, {s: _scaled(n, scale, 5) for s, n in zip(SPLITS, (24, 6, 6))}, _make_texture, (40, 40))
    elif kind == "doodles":
        lay = _flat_layout(kind, seed, {s: _scaled(n, scale, 5) for s, n in zip(SPLITS, (40, 10, 10))}, _make_doodle, (30, 60))
    elif kind == "signs":
        lay = _flat_layout(kind, seed, {"test": _scaled(24, scale, 5)}, _make_sign, (20, 50))
    elif kind == "digits":
        lay = _flat_layout(kind, seed, {"test": 10}, lambda r, c: {"digit": str(c)}, (60, 60))
    elif kind == "patterns":
        lay = _flat_layout(kind, seed, {"test": _scaled(30, scale, 5)}, _make_pattern, (30, 30))
    else:
        raise ValueError(f"unknown synthetic source {kind!r} (have {ALL_SOURCES})")
    lay.spec.name = kind
    lay.entries = [ClassEntry(c, lay.spec.class_names[c], s) for s in SPLITS for c in lay.spec.classes(s)]
    return lay


# ---------------------------------------------------------------- renderers (one image)


def _poly(shape: str, n_star: int = 5) -> Optional[np.ndarray]:
    if shape in ("triangle", "square", "pentagon", "hexagon", "octagon", "diamond", "down"):
        n = {"triangle": 3, "down": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}[shape]
        off = {"square": math.pi / 4, "down": math.pi / 2, "octagon": math.pi / 8}.get(shape, -math.pi / 2)
        a = off + np.arange(n) * 2 * math.pi / n
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = -math.pi / 2 + np.arange(2 * n_star) * math.pi / n_star
        r = np.where(np.arange(2 * n_star) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w = 0.33
        return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w],
                         [-1, -w], [-w, -w]])
    return None


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    pts = _poly(shape)
    if pts is None:  # circle / ring
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if shape == "ring":
            d.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
        return
    c, s = math.cos(rot), math.sin(rot)
    xy = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]
    d.polygon(xy, fill=fill)


def render_objects(p: dict, rng: np.random.Generator) -> bytes:
    S, R = 40, 64
    img = _background(rng, R)
    mask = Image.new("L", (R, R), 0)
    r = R * 0.27 * p["size"] * rng.uniform(0.8, 1.2)
    cx, cy = R / 2 + rng.uniform(-0.17, 0.17, 2) * R
    _draw_shape(ImageDraw.Draw(mask), p["shape"], cx, cy, r, p["rot"] + rng.normal(0, 0.35), 255)
    col = np.array(_hsv(p["hue"] + rng.normal(0, 0.02), p["sat"] + rng.normal(0, 0.07), p["val"] + rng.normal(0, 0.07)), np.float32)
    col2 = np.array(_hsv(p["hue2"], 0.3, 0.9 if p["val"] < 0.75 else 0.25), np.float32)
    yy, xx = _grid(R)
    if p["fill"] == "stripes":
        a = p["stripe"] + rng.normal(0, 0.15)
        t = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / 10 + rng.random() * 6.3) > 0)[..., None]
        fill = np.where(t, col, col2)
    elif p["fill"] == "dots":
        ph = rng.random(2) * 10
        t = ((((xx + ph[0]) % 10) - 5) ** 2 + (((yy + ph[1]) % 10) - 5) ** 2 < 6.5)[..., None]
        fill = np.where(t, col2, col)
    else:
        fill = np.broadcast_to(col, (R, R, 3))
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    arr = np.asarray(img, dtype=np.float32) * (1 - m) + fill * m + _noise(rng, (R, R, 3), 6)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize((S, S), Image.BOX)
    return _encode(out, "jpg")


def _strokes_image(strokes: Sequence[np.ndarray], R: int, width: float, ink: int, paper: int) -> Image.Image:
    img = Image.new("L", (R, R), paper)
    d = ImageDraw.Draw(img)
    for st in strokes:
        xy = [(float(x) * R, float(y) * R) for x, y in st]
        d.line(xy, fill=ink, width=max(1, int(round(width))), joint="curve")
    return img


def render_glyphs(p: dict, rng: np.random.Generator) -> bytes:
    S, R = 36, 72
    rot, sc, sh = rng.normal(0, 0.22), rng.normal(1.0, 0.1), rng.normal(0, 0.06, 2)
    strokes = []
    for part in p["parts"]:
        pts = p["prims"][part["prim"]] + rng.normal(0, 0.035, p["prims"][part["prim"]].shape)
        pts = _affine(pts, part["rot"], part["scale"], np.array(part["off"]))
        if p["curvy"]:
            pts = _chaikin(pts)
        strokes.append(_affine(pts, rot, sc * 0.9, sh))
    img = _strokes_image(strokes, R, p["width"] * rng.uniform(0.8, 1.2) * R / 72, 0, 255)
    return _encode(img.resize((S, S), Image.BOX), "png")


def render_textures(p: dict, rng: np.random.Generator) -> bytes:
    S = 48
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    th = p["theta"] + rng.normal(0, 0.15)
    f = p["freq"] * rng.uniform(0.9, 1.1)
    u = xx * math.cos(th) + yy * math.sin(th)
    v = -xx * math.sin(th) + yy * math.cos(th)
    ph = rng.random(2) * 2 * math.pi
    k = p["sharp"]
    typ = p["type"]
    if typ == "stripes":
        t = np.tanh(k * np.sin(2 * math.pi * f * u + ph[0]))
    elif typ == "checks":
        t = np.tanh(k * np.sin(2 * math.pi * f * u + ph[0]) * np.sin(2 * math.pi * f * v + ph[1]))
    elif typ == "dots":
        du = (f * u + ph[0] / 6.3) % 1 - 0.5
        dv = (f * v + ph[1] / 6.3) % 1 - 0.5
        t = 2 * np.exp(-(du ** 2 + dv ** 2) / (2 * (0.08 + 0.02 * k / 7) ** 2)) - 1
    elif typ == "waves":
        t = np.tanh(k * np.sin(2 * math.pi * f * u + p["amp"] * np.sin(2 * math.pi * p["freq2"] * v + ph[1]) + ph[0]))
    elif typ == "plaid":
        t = 0.5 * (np.tanh(k * np.sin(2 * math.pi * f * u + ph[0])) + np.tanh(k * np.sin(2 * math.pi * p["freq2"] * v + ph[1])))
    else:  # blobs: smooth noise at the class's scale
        n = max(2, int(round(f)))
        g = rng.normal(0, 1, (n + 1, n + 1)).astype(np.float32)
        t = np.asarray(Image.fromarray(g).resize((S, S), Image.BICUBIC))
        t = np.tanh(k * t / (np.abs(t).max() + 1e-6))
    t = (t[..., None] + 1) / 2
    (h1, s1, v1), (h2, s2, v2) = _texture_palettes(p["seed"])[p["palette"]]
    dh = rng.normal(0, 0.06)
    c1 = np.array(_hsv(h1 + dh, s1 + rng.normal(0, 0.1), v1 + rng.normal(0, 0.1)), np.float32)
    c2 = np.array(_hsv(h2 + dh, s2 + rng.normal(0, 0.1), v2 + rng.normal(0, 0.1)), np.float32)
    arr = c1 * (1 - t) + c2 * t + _noise(rng, (S, S, 3), 10)
    return _encode(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "jpg")


def render_doodles(p: dict, rng: np.random.Generator) -> bytes:
    S, R = 28, 56
    rot, sc, sh = rng.normal(0, 0.3), rng.normal(1.0, 0.12), rng.normal(0, 0.06, 2)
    strokes = []
    for i, st in enumerate(p["strokes"]):
        if i > 0 and rng.random() < 0.1:
            continue
        pts = st + rng.normal(0, 0.045, st.shape)
        strokes.append(_affine(_chaikin(pts), rot, sc, sh))
    img = _strokes_image(strokes, R, rng.uniform(2.5, 4.5), 0, 255)
    return _encode(img.resize((S, S), Image.BOX), "png")


@lru_cache(maxsize=8)
def _font(size: int):
    return ImageFont.load_default(size=size)


def render_signs(p: dict, rng: np.random.Generator) -> bytes:
    R = 72
    img = _background(rng, R, sat=0.5, clutter=4)
    d = ImageDraw.Draw(img)
    r = R * rng.uniform(0.3, 0.42)
    cx, cy = R / 2 + rng.uniform(-0.1, 0.1, 2) * R
    rot = rng.normal(0, 0.08)
    _draw_shape(d, p["shape"], cx, cy, r, rot, p["border"])
    _draw_shape(d, p["shape"], cx, cy + (0.08 * r if p["shape"] == "triangle" else -0.08 * r if p["shape"] == "down" else 0),
                r * 0.72, rot, p["plate"])
    font = _font(int(r * 0.8))
    d.text((cx, cy), p["symbol"], fill=(15, 15, 15), font=font, anchor="mm")
    arr = np.asarray(img, dtype=np.float32) * np.float32(rng.uniform(0.55, 1.15)) + _noise(rng, (R, R, 3), 7)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    side = int(rng.integers(32, 49))
    return _encode(out.resize((side, side), Image.BILINEAR), "jpg")


def render_digits(p: dict, rng: np.random.Generator) -> bytes:
    R, S = 56, 28
    img = Image.new("L", (R, R), 0)
    d = ImageDraw.Draw(img)
    d.text((R / 2, R / 2), p["digit"], fill=255, font=_font(int(rng.integers(26, 38))), anchor="mm")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.MaxFilter(3))
    img = img.rotate(float(rng.normal(0, 12)), resample=Image.BILINEAR, translate=tuple(rng.normal(0, 3, 2)))
    return _encode(img.resize((S, S), Image.BOX), "png")


def render_patterns(p: dict, rng: np.random.Generator) -> bytes:
    S = 32
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    j = rng.uniform(-0.12, 0.12, 2)
    lay = p["layout"]
    if lay == "quadrants":
        lab = (xx > 0.5 + j[0]).astype(int) + (yy > 0.5 + j[1]).astype(int)
    elif lay == "hbands":
        lab = np.digitize(yy, [0.33 + j[0], 0.67 + j[1]])
    elif lay == "vbands":
        lab = np.digitize(xx, [0.33 + j[0], 0.67 + j[1]])
    elif lay == "rings":
        rr = np.hypot(xx - 0.5 - j[0] / 2, yy - 0.5 - j[1] / 2)
        lab = np.digitize(rr, [0.17 + j[0] / 3, 0.34 + j[1] / 3])
    elif lay == "diagonal":
        lab = np.digitize(xx + yy, [0.8 + j[0], 1.2 + j[1]])
    else:
        rr = np.hypot(xx - 0.5 - j[0], yy - 0.5 - j[1])
        lab = np.where(rr < 0.22, 1, np.where(xx > 0.5, 2, 0))
    base = rng.random()
    cols = np.array([_hsv(base + h + rng.normal(0, 0.03), s + rng.normal(0, 0.08), v + rng.normal(0, 0.08))
                     for h, s, v in zip(p["hues"], p["sats"], p["vals"])], dtype=np.float32)
    arr = cols[lab] + _noise(rng, (S, S, 3), 10)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return _encode(img, "jpg")


RENDER = {"objects": render_objects, "glyphs": render_glyphs, "textures": render_textures, "doodles": render_doodles,
          "signs": render_signs, "digits": render_digits, "patterns": render_patterns}


class SynthSource(InputSource):
    """One synthetic source as a conversion input (so it goes through the same writer)."""

    fmt = "synth"

    def __init__(self, kind: str, seed: int = 0, scale: float = 1.0):
        if kind not in RENDER:
            raise ValueError(f"unknown synthetic source {kind!r} (have {ALL_SOURCES})")
        self.name, self.kind, self.seed, self.scale = kind, kind, int(seed), float(scale)

    def _layout(self) -> _Layout:
        return layout(self.kind, self.seed, self.scale)

    def entries(self) -> List[ClassEntry]:
        return list(self._layout().entries)

    def spec(self) -> SourceSpec:
        return self._layout().spec

    def read_class(self, entry: ClassEntry) -> Iterator[Tuple[object, dict]]:
        lay = self._layout()
        p = lay.protos[entry.class_id]
        render = RENDER[self.kind]
        for i in range(lay.counts[entry.class_id]):
            yield render(p, _rng(self.seed, _KIND_ID[self.kind], entry.class_id, i)), {"ref": f"synth:{i}"}

    def origin(self) -> dict:
        return {"format": "synth", "kind": self.kind, "seed": self.seed, "scale": self.scale}


def build_synth(out: str, seed: int = 0, scale: float = 1.0, sources: Sequence[str] = ALL_SOURCES,
                opts: Optional[WriteOptions] = None) -> List[str]:
    """Build the benchmark under ``out``; returns the manifest paths."""
    opts = opts or WriteOptions(shard_bytes=4 * 1024 * 1024, tier="native")
    return [str(p) for p in build_sources([SynthSource(k, seed, scale) for k in sources], out, opts)]


__all__ = ["ALL_SOURCES", "ID_SOURCES", "OOD_SOURCES", "SynthSource", "build_synth", "layout"]
