"""The street-scene renderer behind :mod:`cskd.data.synthetic` (one image + its exact label map per call).

A pinhole camera looks down a street: a ground plane (road, sidewalks, grass strips) between two rows of building
facades, a far block closing the street, then walls, fences, trees, poles with signs and lights, cars and people,
drawn far-to-near so nearer things occlude farther ones. Every surface is placed in metres and projected, so size
and texture scale follow depth (``x = x_v + F·X/Z``, ``y = y_h + F·(h_cam − Y)/Z``).

What makes it a segmentation problem rather than a colour look-up, by design:

- road and sidewalk are drawn from the same grey; the road has grain, stains, tyre tracks and lane paint, the
  sidewalk has paving joints and per-tile jitter. Building and wall share one colour distribution; buildings have
  windows and height, walls have block courses and stand low in front. Vegetation and terrain share greens; trees
  are tall clumpy blobs, grass is flat ground. Person clothing and car paint are drawn from wide, overlapping ranges.
- fine patterns fade into their mean colour once a pattern period shrinks below a few pixels (what a real lens does),
  so far surfaces can only be told apart from context;
- thin structures (poles 1–3 px wide, sign posts, fence bars), small far objects, occlusion chains;
- illumination: a sunny and a shaded facade side, cast shadows across road and sidewalk, exposure, white balance,
  gamma, haze with depth, vignetting, sensor noise and occasional blur.

Everything is vectorised numpy on whole rows/columns or on an object's bounding box; there is no per-pixel Python.
The output is a pure function of the ``numpy.random.Generator`` handed in.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Cityscapes label ids (the official table) of what the renderer draws.
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = 17, 19, 20, 21, 22, 23, 24, 26
EGO_VEHICLE = 1  # the bonnet at the bottom of some frames: a Cityscapes id that trains as "ignore"

#: Cityscapes ids whose objects are numbered in ``*_instanceIds.png`` (``hasInstances`` in the official table: 24-33).
INSTANCE_LABEL_IDS = tuple(range(24, 34))

#: Label ids the renderer can write that count as classes (ego vehicle is written too but is ignored in training).
DRAWN_IDS = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY,
             PERSON, CAR)

F32 = np.float32


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """h×w float32 noise in about [-1, 1] with features ~h/cells_y tall: a coarse random grid, bilinearly enlarged."""
    grid = rng.uniform(-1.0, 1.0, (max(cells_y, 1) + 1, max(cells_x, 1) + 1)).astype(F32)
    return np.asarray(Image.fromarray(grid).resize((max(w, 1), max(h, 1)), Image.BILINEAR), dtype=F32)


def _between(rng: np.random.Generator, low: float, high: float) -> float:
    """Uniform in [low, high]; just ``low`` when the range is empty (extreme image shapes push the nearest
    visible ground point beyond where some objects would stand)."""
    return float(rng.uniform(low, max(low, high)))


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _line_strength(coord: np.ndarray, period: float | np.ndarray, half_width: float | np.ndarray,
                   footprint: np.ndarray | float) -> np.ndarray:
    """Fraction of each pixel covered by stripes of ``half_width`` centred every ``period`` (metres).

    Point-sampling thin stripes aliases into noise; a pixel is a box of ``footprint`` metres, so its value is the
    exact overlap of that box with the nearest stripe. Once the footprint grows towards the period the pattern fades
    to its mean everywhere, as a lens's low-pass would make it: far textures stop carrying information.
    """
    d = np.abs(_frac(coord / period + 0.5) - 0.5) * period  # distance to the nearest stripe centre, metres
    half_fp = np.maximum(footprint, 1e-6) * 0.5
    overlap = np.minimum(half_width, d + half_fp) - np.maximum(-half_width, d - half_fp)
    cover = np.minimum(np.maximum(overlap / (2.0 * half_fp), 0.0), 1.0)
    mean = np.minimum(2.0 * half_width / period, 1.0)
    fade = np.minimum(np.maximum(4.0 * half_fp / period - 0.5, 0.0), 1.0)
    return (cover + (mean - cover) * fade).astype(F32, copy=False)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) → RGB in [0, 255], shape (..., 3)."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return (np.stack([r, g, b], axis=-1) * 255.0).astype(F32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) → RGB float32 in [0, 255]."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), F32) * F32(255.0)


def _facade_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """Plaster, brick, concrete and stone colours: the one distribution both buildings and walls draw from."""
    kind = rng.integers(0, 4, n)
    h = np.choose(kind, [rng.uniform(0.05, 0.12, n), rng.uniform(0.0, 0.05, n), rng.uniform(0.0, 1.0, n),
                         rng.uniform(0.08, 0.16, n)])
    s = np.choose(kind, [rng.uniform(0.15, 0.4, n), rng.uniform(0.35, 0.6, n), rng.uniform(0.0, 0.06, n),
                         rng.uniform(0.05, 0.25, n)])
    v = np.choose(kind, [rng.uniform(0.55, 0.9, n), rng.uniform(0.35, 0.6, n), rng.uniform(0.35, 0.8, n),
                         rng.uniform(0.45, 0.75, n)])
    return _hsv_to_rgb(h, s, v)


def _paint_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """Car paint: mostly greys, white, black, then saturated reds, blues, greens, a few yellows."""
    grey = rng.random(n) < 0.55
    v = np.where(grey, rng.choice(np.array([0.12, 0.3, 0.55, 0.75, 0.92]), n) + rng.uniform(-0.06, 0.06, n),
                 rng.uniform(0.3, 0.85, n))
    s = np.where(grey, rng.uniform(0.0, 0.08, n), rng.uniform(0.45, 0.9, n))
    h = rng.choice(np.array([0.0, 0.6, 0.62, 0.33, 0.12, 0.95, 0.55]), n) + rng.uniform(-0.03, 0.03, n)
    return _hsv_to_rgb(np.mod(h, 1.0), s, np.clip(v, 0.05, 1.0))


def _cloth_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return _hsv_to_rgb(rng.random(n), rng.uniform(0.0, 0.75, n) ** 1.5, rng.uniform(0.08, 0.9, n))


@dataclass
class _Camera:
    H: int
    W: int
    F: float  # focal length, pixels
    cam_h: float  # camera height above the ground, metres
    y_h: float  # horizon row
    x_v: float  # vanishing-point column

    def col(self, X: float | np.ndarray, Z: float | np.ndarray) -> np.ndarray | float:
        return self.x_v + self.F * X / Z

    def row(self, Y: float | np.ndarray, Z: float | np.ndarray) -> np.ndarray | float:
        return self.y_h + self.F * (self.cam_h - Y) / Z

    def side_plane(
        self, X: float, sg: int, z0: float, z1: float, box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixels of ``box`` (y0, y1, x0, x1) seen on the vertical street-parallel plane at lateral ``X`` (side
        ``sg``): per column its depth Z (−1 where the ray misses that side), per pixel its height Y above the
        ground, and the columns whose depth lies in [z0, z1]."""
        y0, y1, x0, x1 = box
        dx = np.arange(x0, x1, dtype=F32) + 0.5 - self.x_v
        ok = sg * dx > 0.5
        Z = np.where(ok, self.F * X / np.where(ok, dx, 1.0), -1.0).astype(F32)
        ok &= (Z >= z0) & (Z <= z1)
        yc = np.arange(y0, y1, dtype=F32)[:, None] + 0.5
        Y = self.cam_h - (yc - self.y_h) * Z[None, :] / self.F
        return Z, Y, ok


class _Canvas:
    """Float RGB image, label ids and depth, painted back to front."""

    def __init__(self, cam: _Camera) -> None:
        self.cam = cam
        self.img = np.zeros((cam.H, cam.W, 3), F32)
        self.lab = np.zeros((cam.H, cam.W), np.uint8)
        self.depth = np.zeros((cam.H, cam.W), F32)  # 0 = no haze (sky)
        self.inst = np.zeros((cam.H, cam.W), np.int32)  # which object (1, 2, ...) painted each pixel; 0 = none
        self.instance = 0  # the object being drawn

    def box(self, y0: float, y1: float, x0: float, x1: float) -> tuple[int, int, int, int] | None:
        """Integer pixel bounds of a float box, clipped to the image; None when nothing is left."""
        iy0, iy1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.cam.H)
        ix0, ix1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.cam.W)
        if iy1 <= iy0 or ix1 <= ix0:
            return None
        return iy0, iy1, ix0, ix1

    def paint(self, b: tuple[int, int, int, int], mask: np.ndarray | None, colour: np.ndarray, label: int,
              depth: float | np.ndarray, alpha: np.ndarray | float | None = None) -> None:
        """Write ``colour`` (h×w×3 or 3) where ``mask`` (h×w; None = the whole box) holds; ``alpha`` blends with
        what is behind."""
        y0, y1, x0, x1 = b
        img = self.img[y0:y1, x0:x1]
        colour = np.asarray(colour, F32)
        if alpha is not None:
            a = alpha[..., None] if isinstance(alpha, np.ndarray) else F32(alpha)
            colour = colour * a + img * (1.0 - a)
        if mask is None:
            img[...] = colour
            self.lab[y0:y1, x0:x1] = label
            self.inst[y0:y1, x0:x1] = self.instance
            self.depth[y0:y1, x0:x1] = depth
            return
        img[mask] = colour[mask] if colour.ndim == 3 else colour
        self.lab[y0:y1, x0:x1][mask] = label
        self.inst[y0:y1, x0:x1][mask] = self.instance
        d = self.depth[y0:y1, x0:x1]
        d[mask] = depth[mask] if isinstance(depth, np.ndarray) else depth


class _Street:
    """One street: camera, the road cross-section and the building rows; the objects are drawn from it."""

    def __init__(self, rng: np.random.Generator, H: int, W: int) -> None:
        self.rng = rng
        cam = _Camera(H, W, F=W * rng.uniform(0.5, 0.8), cam_h=rng.uniform(1.3, 1.8),
                      y_h=H * rng.uniform(0.34, 0.48), x_v=W * rng.uniform(0.38, 0.62))
        self.cam = cam
        self.cv = _Canvas(cam)
        # Cross-section, left (-1) and right (+1) of the camera: road | grass strip | sidewalk | yard | facade.
        self.road = (-rng.uniform(2.5, 7.0), rng.uniform(2.5, 7.0))
        self.side: dict[int, dict[str, float]] = {}
        for sg, edge in ((-1, self.road[0]), (1, self.road[1])):
            strip = rng.uniform(0.8, 2.5) if rng.random() < 0.35 else 0.0
            walk = rng.uniform(2.0, 6.0)
            yard = rng.uniform(1.0, 6.0) if rng.random() < 0.3 else 0.0
            self.side[sg] = {
                "edge": edge,
                "strip_out": edge + sg * strip,
                "walk_out": edge + sg * (strip + walk),
                "facade": edge + sg * (strip + walk + yard),
                "strip": strip,
                "lot": float(SIDEWALK if rng.random() < 0.5 else TERRAIN),
                "shade": rng.uniform(0.9, 1.1),
            }
        sun_side = int(rng.choice([-1, 1]))
        self.side[-sun_side]["shade"] = rng.uniform(0.5, 0.85)
        self.sun_side = sun_side
        self.z_end = rng.uniform(50.0, 250.0)  # where the street ends (far block) or fades out
        self.far_block = rng.random() < 0.65
        self.z_near = cam.F * cam.cam_h / max(H - cam.y_h, 1.0)  # depth of the bottom image row
        self.road_rgb = (rng.uniform(70.0, 140.0) + rng.uniform(-6.0, 6.0, 3)).astype(F32)
        # Same grey family as the road; the texture must do the separating.
        self.walk_rgb = (self.road_rgb + rng.uniform(-14.0, 14.0) + rng.uniform(-4, 4, 3)).astype(F32)
        g = rng.uniform(0.18, 0.32)
        self.grass_rgb = _hsv(g, rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.6))
        self.lanes = self._lanes()

    # ---------------------------------------------------------------- background
    def _lanes(self) -> list[tuple[float, bool]]:
        """Lane-paint positions (lateral metres) and whether each is dashed."""
        rng = self.rng
        left, right = self.road
        width = right - left
        n = max(1, int(round(width / rng.uniform(2.9, 3.6))))
        lines = [(left + width * k / n, True) for k in range(1, n)]
        if rng.random() < 0.6:
            lines += [(left + 0.35, False), (right - 0.35, False)]
        return lines

    def sky(self) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        rows = min(int(np.ceil(cam.y_h)) + 1, cam.H)
        kind = rng.random()
        if kind < 0.55:  # clear
            top = _hsv(rng.uniform(0.55, 0.62), rng.uniform(0.35, 0.7), rng.uniform(0.6, 0.9))
            hor = top * 0.3 + 255 * 0.7 * rng.uniform(0.8, 1.0)
        elif kind < 0.85:  # overcast: the grey that buildings and roads also have
            top = np.full(3, rng.uniform(140, 220), F32)
            hor = top + rng.uniform(0, 30)
        else:  # dusk
            top = _hsv(rng.uniform(0.58, 0.7), 0.5, rng.uniform(0.3, 0.6))
            hor = _hsv(rng.uniform(0.02, 0.1), 0.6, rng.uniform(0.7, 0.95))
        t = (np.arange(rows, dtype=F32)[:, None] / max(cam.y_h, 1.0)) ** 1.5
        grad = top[None, :] * (1 - t) + hor[None, :] * t  # rows×3
        img = np.broadcast_to(grad[:, None, :], (rows, cam.W, 3)).copy()
        if kind < 0.85 and rng.random() < 0.7:
            cloud = _smooth_noise(rng, rows, cam.W, 3, int(rng.integers(4, 10)))
            c = np.clip((cloud - rng.uniform(-0.2, 0.5)) * 2.5, 0, 1)[..., None] * rng.uniform(0.4, 0.9)
            img = img * (1 - c) + 240.0 * c
        cv.img[:rows] = img
        cv.lab[:rows] = SKY
        self.haze_rgb = hor.astype(F32)

    def ground(self) -> None:
        """Road, sidewalks and grass on the ground plane; each surface's texture is computed on its own pixels."""
        rng, cam, cv = self.rng, self.cam, self.cv
        r0 = int(np.floor(cam.y_h + 0.5))
        if r0 >= cam.H:
            return
        yc = np.arange(r0, cam.H, dtype=F32) + 0.5
        Zrow = np.minimum(cam.F * cam.cam_h / np.maximum(yc - cam.y_h, 1e-3), 1e4).astype(F32)
        xc = np.arange(cam.W, dtype=F32) + 0.5
        h, w = len(yc), cam.W
        X = (xc[None, :] - cam.x_v) * (Zrow[:, None] / cam.F)  # rows×W, lateral metres
        L, R = self.side[-1], self.side[1]
        edges = np.array([L["facade"], L["walk_out"], L["strip_out"], L["edge"], R["edge"], R["strip_out"],
                          R["walk_out"], R["facade"]], F32)
        band_cls = np.array([L["lot"], TERRAIN, SIDEWALK, TERRAIN, ROAD, TERRAIN, SIDEWALK, TERRAIN, R["lot"]],
                            np.uint8)
        lab = band_cls[np.searchsorted(edges, X, side="right")]
        img = cv.img[r0:]
        grain = rng.standard_normal((h, w), dtype=F32)
        stains = _smooth_noise(rng, h, w, int(rng.integers(3, 8)), int(rng.integers(6, 16)))
        rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
        # The shade-side buildings throw a shadow across part of the street (bluish: lit by the sky only).
        sg = -self.sun_side
        shadow_from = sg * self.side[sg]["facade"] - rng.uniform(0.0, 1.0) * (self.road[1] - self.road[0] + 8.0)
        shadow_rgb = np.array([0.55, 0.58, 0.68], F32) * rng.uniform(0.8, 1.1)

        def shadowed(x: np.ndarray) -> np.ndarray:
            return np.where((sg * x > shadow_from)[:, None], shadow_rgb, F32(1.0))

        def pick(cls: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            m = lab == cls
            z = Zrow[rows[m]]
            return m, X[m], z, z * z / (cam.F * cam.cam_h), z / cam.F, grain[m]

        # Road: asphalt grain, stains, tyre tracks, lane paint (coverage-filtered like every stripe here).
        m, x, z, fz, fx, g = pick(ROAD)
        left, right = self.road
        n_lanes = sum(1 for _, dashed in self.lanes if dashed) + 1
        lane_w = (right - left) / n_lanes
        shade = 1.0 + stains[m] * rng.uniform(0.03, 0.12) + g * rng.uniform(0.03, 0.08)
        to_centre = np.abs(_frac((x - left) / lane_w) - 0.5) * lane_w  # distance to the lane's centre line
        track = _line_strength(to_centre - 0.8, 1e4, 0.25, fx)
        shade *= 1.0 - rng.uniform(0.0, 0.12) * track
        period, duty = rng.uniform(6.0, 12.0), rng.uniform(0.3, 0.6)
        paint = np.zeros_like(x)
        if n_lanes > 1:
            inner = (x > left + lane_w * 0.5) & (x < right - lane_w * 0.5)
            dashes = _frac(z / period + rng.random()) < duty
            paint = _line_strength(x - left, lane_w, rng.uniform(0.05, 0.08), fx) * (inner & dashes)
        for x_line, dashed in self.lanes:
            if not dashed:
                paint = np.maximum(paint, _line_strength(x - x_line, 1e4, rng.uniform(0.05, 0.08), fx))
        if rng.random() < 0.25:  # zebra crossing
            z0 = rng.uniform(6.0, 30.0)
            inside = (z > z0) & (z < z0 + rng.uniform(3.0, 5.0))
            paint = np.maximum(paint, _line_strength(x, 1.0, 0.25, fx) * inside)
        paint *= rng.uniform(0.55, 0.95)
        paint_rgb = np.array([235, 235, 225] if rng.random() < 0.8 else [230, 200, 90], F32)
        img[m] = (self.road_rgb * shade[:, None] * (1.0 - paint[:, None]) + paint_rgb * paint[:, None]) * shadowed(x)

        # Sidewalk: paving joints on a metric grid, per-tile brightness jitter, an optional kerb line.
        m, x, z, fz, fx, g = pick(SIDEWALK)
        tile_x, tile_z = rng.uniform(0.25, 0.6), rng.uniform(0.25, 0.6)
        jw = rng.uniform(0.012, 0.03)
        joints = np.maximum(_line_strength(x, tile_x, jw, fx), _line_strength(z, tile_z, jw, fz))
        jitter_tab = rng.uniform(-1.0, 1.0, (8, 8)).astype(F32)
        jitter = jitter_tab[np.floor(z / tile_z).astype(np.int64) & 7, np.floor(x / tile_x).astype(np.int64) & 7]
        jitter *= np.clip(1.0 - np.maximum(fx / tile_x, fz / tile_z), 0.0, 1.0) * rng.uniform(0.02, 0.07)
        wshade = (1.0 - joints * rng.uniform(0.25, 0.45)) * (1.0 + jitter) * (1.0 + stains[m] * 0.03 + g * 0.015)
        if rng.random() < 0.65:
            kerb = np.maximum(*(_line_strength(x - self.side[sg]["strip_out"] - sg * 0.08, 1e4, 0.08, fx)
                                for sg in (-1, 1)))
            wshade *= 1.0 + kerb * rng.uniform(0.1, 0.3)
        img[m] = self.walk_rgb * wshade[:, None] * shadowed(x)

        # Grass: its own green, blotchy, finer grain than the trees.
        m = lab == TERRAIN
        img[m] = (self.grass_rgb * (1.0 + stains[m] * 0.12 + grain[m] * rng.uniform(0.06, 0.14))[:, None]
                  * shadowed(X[m]))

        cv.lab[r0:] = lab
        cv.depth[r0:] = Zrow[:, None]

    def _segments(self, rng: np.random.Generator, back: bool) -> dict[str, np.ndarray]:
        bounds = [0.0]
        while bounds[-1] < self.z_end + 30:
            bounds.append(bounds[-1] + rng.uniform(6.0, 25.0))
        n = len(bounds) - 1
        b = np.array(bounds, F32)
        return {
            "bounds": b,
            "present": rng.random(n) < (1.0 if back else 0.8),
            "height": rng.uniform(4.0, 26.0, n).astype(F32) * (1.3 if back else 1.0),
            "colour": _facade_colours(rng, n),
            "su": rng.uniform(2.2, 4.0, n).astype(F32),
            "sv": rng.uniform(2.8, 3.6, n).astype(F32),
            "fu": rng.uniform(0.3, 0.65, n).astype(F32),
            "fv": rng.uniform(0.35, 0.6, n).astype(F32),
            "ground": rng.uniform(0.0, 4.0, n).astype(F32),
            "glass": _hsv_to_rgb(rng.uniform(0.5, 0.65, n), rng.uniform(0.0, 0.35, n), rng.uniform(0.08, 0.55, n)),
        }

    def facade_row(self, sg: int, back: bool) -> None:
        """One row of buildings along the street on side ``sg``. A ``back`` row stands further out and shows in the
        gaps and above lower buildings; it is sometimes a line of trees (a park) instead."""
        rng, cam, cv = self.rng, self.cam, self.cv
        Xb = self.side[sg]["facade"] + (sg * rng.uniform(8.0, 30.0) if back else 0.0)
        trees = back and rng.random() < 0.35
        seg = self._segments(rng, back)
        xc = np.arange(cam.W, dtype=F32) + 0.5
        dx = xc - cam.x_v
        valid = (sg * dx) > 0.5
        Z = np.where(valid, cam.F * Xb / np.where(valid, dx, 1.0), np.inf).astype(F32)
        valid &= (Z > 0.5) & (Z < (self.z_end if self.far_block else 1e4))
        k = np.clip(np.searchsorted(seg["bounds"], Z, side="right") - 1, 0, len(seg["present"]) - 1)
        valid &= seg["present"][k] | trees
        if not valid.any():
            return
        cols = np.nonzero(valid)[0]
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        Zc, kc, vc = Z[c0:c1], k[c0:c1], valid[c0:c1]
        if trees:  # a bumpy canopy line: height varies every few metres along the street
            knots = np.arange(0.0, float(np.max(Zc[vc])) + 4.0, rng.uniform(1.5, 4.0))
            height = np.interp(Zc, knots, rng.uniform(5.0, 14.0, len(knots))).astype(F32)
        else:
            height = seg["height"][kc]
        top = cam.row(height, Zc)
        bot = cam.row(0.0, Zc)
        r0 = max(int(np.floor(np.min(top[vc]))), 0)
        r1 = min(int(np.ceil(np.max(bot[vc]))), cam.H)
        if r1 <= r0:
            return
        yc = np.arange(r0, r1, dtype=F32)[:, None] + 0.5
        mask = vc[None, :] & (yc >= top[None, :]) & (yc < bot[None, :])
        b = (r0, r1, c0, c1)
        if trees:
            green = _hsv(rng.uniform(0.17, 0.33), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.5))
            h, w = mask.shape
            clumps = _smooth_noise(rng, h, w, max(h // 6, 1), max(w // 6, 1))
            fine = rng.standard_normal((h, w), dtype=F32)
            col = green * (1.0 + 0.35 * clumps + 0.15 * fine)[..., None] * self.side[sg]["shade"]
            cv.paint(b, mask, col, VEGETATION, np.broadcast_to(Zc[None, :], mask.shape))
            return
        # Texture only where the facade is: compact the masked pixels first.
        rr, cc = np.nonzero(mask)
        z, kk = Zc[cc], kc[cc]
        Y = cam.cam_h - (yc[rr, 0] - cam.y_h) * z / cam.F  # height above ground, metres
        u = z - seg["bounds"][kk]  # metres along the facade from the building's start
        fu = z * z / (cam.F * abs(Xb))  # metres per column along the facade
        fv = z / cam.F  # metres per row
        su, sv, ground = seg["su"][kk], seg["sv"][kk], seg["ground"][kk]
        win = (_line_strength(u - su * 0.5, su, seg["fu"][kk] * su * 0.5, fu)
               * _line_strength(Y - ground - sv * 0.5, sv, seg["fv"][kk] * sv * 0.5, fv)
               * ((Y > ground + 0.8) & (Y < height[cc] - 0.8)))[:, None]
        base = seg["colour"][kk] * self.side[sg]["shade"] * (rng.uniform(0.85, 1.0) if back else 1.0)
        plaster = 1.0 + rng.standard_normal(len(rr), dtype=F32)[:, None] * 0.03
        col = (base * (1.0 - win) + seg["glass"][kk] * win) * plaster
        img = cv.img[r0:r1, c0:c1]
        img[rr, cc] = col
        cv.lab[r0:r1, c0:c1][rr, cc] = BUILDING
        cv.depth[r0:r1, c0:c1][rr, cc] = z

    def far_facade(self) -> None:
        """A block across the street's end: frontal, so its windows sit on a (lateral, height) grid."""
        if not self.far_block:
            return
        rng, cam, cv = self.rng, self.cam, self.cv
        Z = self.z_end
        Xl = self.side[-1]["facade"] - rng.uniform(0.0, 60.0)
        Xr = self.side[1]["facade"] + rng.uniform(0.0, 60.0)
        height = rng.uniform(6.0, 40.0)
        b = cv.box(cam.row(height, Z), cam.row(0.0, Z), cam.col(Xl, Z), cam.col(Xr, Z))
        if b is None:
            return
        y0, y1, x0, x1 = b
        X = (np.arange(x0, x1, dtype=F32)[None, :] + 0.5 - cam.x_v) * Z / cam.F
        Y = cam.cam_h - (np.arange(y0, y1, dtype=F32)[:, None] + 0.5 - cam.y_h) * Z / cam.F
        fp = Z / cam.F
        su, sv = rng.uniform(2.2, 4.0), rng.uniform(2.8, 3.6)
        win = _line_strength(X, su, su * rng.uniform(0.15, 0.3), fp) * _line_strength(Y, sv, sv * 0.25, fp)
        colour = _facade_colours(rng, 1)[0] * rng.uniform(0.8, 1.0)
        glass = _hsv(0.6, 0.2, rng.uniform(0.1, 0.5))
        col = colour * (1 - win[..., None]) + glass * win[..., None]
        cv.paint(b, None, col, BUILDING, Z)

    def walls_and_fences(self) -> None:
        """Low walls (building colours, block courses, no windows) and see-through fences along the yards."""
        rng, cam, cv = self.rng, self.cam, self.cv
        for sg in (-1, 1):
            side = self.side[sg]
            Xw = side["walk_out"] if abs(side["facade"] - side["walk_out"]) > 0.5 else side["facade"] - sg * 0.1
            for _ in range(int(rng.integers(0, 4))):
                z0 = _between(rng, max(self.z_near, 2.0), 70.0)
                z1 = z0 + rng.uniform(3.0, 25.0)
                is_wall = rng.random() < 0.55
                height = rng.uniform(0.6, 2.6) if is_wall else rng.uniform(0.9, 2.0)
                x_a, x_b = cam.col(Xw, z0), cam.col(Xw, z1)
                b = cv.box(cam.row(height, z1) - 1, cam.row(0.0, z0) + 1, min(x_a, x_b), max(x_a, x_b))
                if b is None:
                    continue
                Z, Y, ok = cam.side_plane(Xw, sg, z0, z1, b)
                mask = ok[None, :] & (Y >= 0.0) & (Y <= height)
                if not mask.any():
                    continue
                u = (Z - z0)[None, :]
                fu = (Z * Z / (cam.F * abs(Xw)))[None, :]
                fv = (Z / cam.F)[None, :]
                if is_wall:
                    course = rng.uniform(0.2, 0.45)
                    brick = rng.uniform(0.4, 1.2)
                    jw = rng.uniform(0.01, 0.025)
                    row_j = _line_strength(Y, course, jw, fv)
                    stagger = np.floor(Y / course) % 2 * 0.5 * brick
                    col_j = _line_strength(u + stagger, brick, jw, fu)
                    joints = np.maximum(row_j, col_j) * rng.uniform(0.2, 0.45)
                    cap = (Y > height - 0.1).astype(F32) * rng.uniform(0.0, 0.25)
                    base = _facade_colours(rng, 1)[0] * side["shade"]
                    col = base * ((1.0 - joints + cap) * (1.0 + rng.standard_normal(mask.shape, dtype=F32) * 0.03)
                                  )[..., None]
                    cv.paint(b, mask, col, WALL, np.broadcast_to(Z[None, :], mask.shape))
                else:
                    spacing = rng.uniform(0.1, 0.3)
                    bars = _line_strength(u, spacing, rng.uniform(0.012, 0.03), fu)
                    rails = np.maximum(_line_strength(Y - 0.15, 1e4, 0.03, fv),
                                       _line_strength(Y - height + 0.08, 1e4, 0.04, fv))
                    cover = np.clip(np.maximum(bars, rails) + rng.uniform(0.05, 0.35), 0.0, 1.0)
                    fcol = np.array(rng.choice([[60, 60, 60], [40, 70, 45], [200, 200, 195], [120, 85, 55]]), F32)
                    fcol = fcol * rng.uniform(0.8, 1.15) * side["shade"]
                    cv.paint(b, mask, fcol, FENCE, np.broadcast_to(Z[None, :], mask.shape), alpha=cover)

    # ---------------------------------------------------------------- objects (drawn far to near)
    def objects(self) -> list[tuple[float, tuple[str, float, float]]]:
        """(depth, (kind, lateral X, depth Z)) of every object, farthest first (painter's order)."""
        rng = self.rng
        out: list[tuple[float, tuple[str, float, float]]] = []
        zmin = max(self.z_near * 1.05, 3.0)
        zmax = self.z_end if self.far_block else 150.0
        for sg in (-1, 1):
            side = self.side[sg]
            walk_in = side["strip_out"]
            walk_out = side["walk_out"]
            for _ in range(int(rng.integers(0, 10))):  # trees on the grass strip or the sidewalk's outer edge
                X = (side["edge"] + sg * side["strip"] / 2) if side["strip"] > 0 else walk_out - sg * 0.6
                z = zmin + max(zmax - zmin, 0.0) * rng.random() ** 1.5
                out.append((z, ("tree", X + rng.uniform(-0.3, 0.3), z)))
            for _ in range(int(rng.integers(1, 10))):  # poles at the kerb
                z = zmin + max(zmax * 0.8 - zmin, 0.0) * rng.random() ** 1.3
                out.append((z, ("pole", walk_in - sg * 0.35 + sg * rng.uniform(0.0, 0.3), z)))
            for _ in range(int(rng.integers(0, 9))):  # people on the sidewalk
                z = _between(rng, zmin, min(zmax, 70.0))
                out.append((z, ("person", rng.uniform(min(walk_in, walk_out) + 0.3, max(walk_in, walk_out) - 0.3), z)))
            for _ in range(int(rng.integers(0, 6))):  # parked cars along the kerb, seen from the side
                z = _between(rng, zmin, zmax * 0.7)
                out.append((z, ("parked", side["edge"] - sg * rng.uniform(0.1, 0.4), z)))
        lanes = [c for c, dashed in self.lanes if dashed]
        bounds = [self.road[0], *lanes, self.road[1]]
        for _ in range(int(rng.integers(0, 9))):  # traffic in the lanes, seen from behind or in front
            k = int(rng.integers(0, len(bounds) - 1))
            X = (bounds[k] + bounds[k + 1]) / 2 + rng.uniform(-0.4, 0.4)
            z = _between(rng, zmin + 1.0, min(zmax, 120.0))
            out.append((z, ("car", X, z)))
        for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.5 else 0):  # people crossing
            z = _between(rng, zmin, 30.0)
            out.append((z, ("person", rng.uniform(*self.road), z)))
        out.sort(key=lambda t: -t[0])
        return out

    def draw_objects(self) -> None:
        for k, (_, (kind, X, Z)) in enumerate(self.objects(), 1):
            self.cv.instance = k
            getattr(self, f"_draw_{kind}")(X, Z)
        self.cv.instance = 0

    def _rect(self, X0: float, X1: float, Y0: float, Y1: float, Z: float, colour: np.ndarray, label: int,
              min_px: float = 0.0) -> None:
        """A frontal rectangle at depth Z; ``min_px`` keeps thin things (poles) at least that many pixels wide with
        the colour blended by coverage, so a 0.4-px pole is a faint 1-px line, not a gap."""
        cam, cv = self.cam, self.cv
        xa, xb = cam.col(X0, Z), cam.col(X1, Z)
        width = xb - xa
        if width < min_px:
            mid = (xa + xb) / 2
            xa, xb = mid - min_px / 2, mid + min_px / 2
            alpha_v = max(width / min_px, 0.25)
        else:
            alpha_v = 1.0
        b = cv.box(cam.row(Y1, Z), cam.row(Y0, Z), xa, xb)
        if b is None:
            return
        cv.paint(b, None, colour, label, Z, alpha=alpha_v if alpha_v < 1.0 else None)

    def _ellipse(self, X: float, Y: float, rx: float, ry: float, Z: float, colour: np.ndarray, label: int) -> None:
        cam, cv = self.cam, self.cv
        cx, cy = cam.col(X, Z), cam.row(Y, Z)
        px, py = max(cam.F * rx / Z, 0.6), max(cam.F * ry / Z, 0.6)
        b = cv.box(cy - py, cy + py, cx - px, cx + px)
        if b is None:
            return
        y0, y1, x0, x1 = b
        dy = (np.arange(y0, y1, dtype=F32)[:, None] + 0.5 - cy) / py
        dx = (np.arange(x0, x1, dtype=F32)[None, :] + 0.5 - cx) / px
        cv.paint(b, dx * dx + dy * dy <= 1.0, colour, label, Z)

    def _draw_tree(self, X: float, Z: float) -> None:
        """A trunk and a canopy of overlapping blobs, with one clumpy leaf texture across the canopy."""
        rng, cam, cv = self.rng, self.cam, self.cv
        trunk_h = rng.uniform(1.8, 3.5)
        trunk_w = rng.uniform(0.2, 0.45)
        bark = np.array([70, 55, 40], F32) * rng.uniform(0.6, 1.2)
        self._rect(X - trunk_w / 2, X + trunk_w / 2, 0.0, trunk_h + 0.5, Z, bark, VEGETATION, min_px=1.0)
        r = rng.uniform(1.2, 3.5)
        n = int(rng.integers(2, 6))
        blob = np.stack([rng.uniform(-0.6, 0.6, n) * r + X,  # centre X
                         rng.uniform(-0.4, 0.5, n) * r + trunk_h + 0.8 * r,  # centre Y
                         r * rng.uniform(0.55, 0.9, n),  # radius X
                         rng.uniform(0.8, 1.2, n)], axis=1)  # aspect
        green = _hsv(rng.uniform(0.17, 0.33), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55))
        amp = rng.uniform(0.25, 0.45)
        ry = blob[:, 2] * blob[:, 3]
        top, bottom = float(np.max(blob[:, 1] + ry)), float(np.min(blob[:, 1] - ry))
        left, right = float(np.min(blob[:, 0] - blob[:, 2])), float(np.max(blob[:, 0] + blob[:, 2]))
        b = cv.box(cam.row(top, Z), cam.row(bottom, Z), cam.col(left, Z), cam.col(right, Z))
        if b is None:
            return
        y0, y1, x0, x1 = b
        Xs = (np.arange(x0, x1, dtype=F32)[None, :] + 0.5 - cam.x_v) * Z / cam.F  # metres
        Ys = cam.cam_h - (np.arange(y0, y1, dtype=F32)[:, None] + 0.5 - cam.y_h) * Z / cam.F
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        for bx, by, brx, asp in blob:
            mask |= ((Xs - bx) / brx) ** 2 + ((Ys - by) / (brx * asp)) ** 2 <= 1.0
        h, w = mask.shape
        clumps = _smooth_noise(rng, h, w, max(h // 4, 1), max(w // 4, 1))
        fine = rng.standard_normal((h, w), dtype=F32)
        top_lit = (Ys - bottom) / max(top - bottom, 1e-3)  # 0 at the canopy's lowest point, 1 at its top
        colour = green * (1.0 + amp * clumps + 0.5 * amp * fine + 0.25 * (top_lit - 0.5))[..., None]
        cv.paint(b, mask, colour, VEGETATION, Z - 0.01)

    def _draw_pole(self, X: float, Z: float) -> None:
        rng = self.rng
        height = rng.uniform(2.5, 9.0)
        width = rng.uniform(0.06, 0.22)
        grey = rng.uniform(60, 180)
        colour = np.array([grey, grey, grey + rng.uniform(-10, 10)], F32) * rng.uniform(0.9, 1.05)
        self._rect(X - width / 2, X + width / 2, 0.0, height, Z, colour, POLE, min_px=1.0)
        kind = rng.random()
        if kind < 0.45:  # a sign plate facing the street
            size = rng.uniform(0.5, 1.0)
            yc = min(height - size / 2, rng.uniform(2.0, 3.5))
            face = np.array(rng.choice([[200, 30, 30], [30, 70, 170], [230, 200, 40], [235, 235, 235],
                                        [140, 140, 140]]), F32) * rng.uniform(0.75, 1.1)
            if rng.random() < 0.5:
                self._ellipse(X, yc, size / 2, size / 2, Z - 0.05, face, TRAFFIC_SIGN)
                if rng.random() < 0.6:
                    self._ellipse(X, yc, size / 3, size / 3, Z - 0.06, np.array([235, 235, 235], F32), TRAFFIC_SIGN)
            else:
                self._rect(X - size / 2, X + size / 2, yc - size / 2, yc + size / 2, Z - 0.05, face, TRAFFIC_SIGN)
                if rng.random() < 0.5:
                    self._rect(X - size / 3, X + size / 3, yc - size / 3, yc + size / 3, Z - 0.06,
                               np.array([240, 240, 240], F32), TRAFFIC_SIGN)
        elif kind < 0.75:  # a traffic light: dark housing, one lit lamp
            hw, hh = rng.uniform(0.25, 0.35), rng.uniform(0.75, 1.0)
            yc = max(height - hh / 2 - 0.1, 2.5)
            housing = np.array([30, 30, 28], F32) * rng.uniform(0.6, 2.0)
            self._rect(X - hw / 2, X + hw / 2, yc - hh / 2, yc + hh / 2, Z - 0.05, housing, TRAFFIC_LIGHT)
            lit = int(rng.integers(0, 3))
            for i, rgb in enumerate(([230, 40, 30], [240, 180, 30], [40, 220, 90])):
                on = np.array(rgb, F32) * (1.0 if i == lit else 0.25)
                self._ellipse(X, yc + (1 - i) * hh / 3.2, hw * 0.32, hw * 0.32, Z - 0.06, on, TRAFFIC_LIGHT)
        elif kind < 0.9:  # a street lamp: an arm over the road (pole class, as in Cityscapes)
            arm = rng.uniform(0.8, 2.0) * (1 if X < 0 else -1)
            self._rect(min(X, X + arm), max(X, X + arm), height - 0.12, height, Z, colour, POLE, min_px=1.0)

    def _draw_person(self, X: float, Z: float) -> None:
        rng = self.rng
        h = rng.uniform(1.5, 1.95)
        stride = rng.uniform(0.0, 0.14)  # legs apart when walking
        skin = _hsv(rng.uniform(0.02, 0.09), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.9))
        legs, top = _cloth_colours(rng, 2)
        for off in (-0.08 - stride, 0.08 + stride):
            self._rect(X + off - 0.065, X + off + 0.065, 0.0, 0.5 * h, Z, legs, PERSON, min_px=1.0)
        self._rect(X - 0.2, X + 0.2, 0.47 * h, 0.83 * h, Z - 0.01, top, PERSON, min_px=1.0)
        for off in (-0.25, 0.25):
            self._rect(X + off - 0.045, X + off + 0.045, 0.5 * h, 0.81 * h, Z - 0.02, top * 0.9, PERSON)
        self._ellipse(X, 0.9 * h, 0.1, 0.12, Z - 0.01, skin, PERSON)
        self._ellipse(X, 0.95 * h, 0.1, 0.06, Z - 0.02, _cloth_colours(rng, 1)[0] * 0.5, PERSON)
        if rng.random() < 0.3:
            bag = _cloth_colours(rng, 1)[0]
            self._rect(X + 0.2, X + 0.38, 0.45 * h, 0.62 * h, Z - 0.03, bag, PERSON)

    def _draw_car(self, X: float, Z: float) -> None:
        """A car seen from behind or in front: wheels, body, narrower cabin with dark glass, lights."""
        rng = self.rng
        w, h = rng.uniform(1.65, 2.0), rng.uniform(1.35, 1.7)
        paint = _paint_colours(rng, 1)[0]
        dark = np.array([18, 18, 20], F32) * rng.uniform(0.8, 1.6)
        # contact shadow on the road first (it is road, not car)
        cam, cv = self.cam, self.cv
        y_ground = cam.row(0.0, Z)
        b = cv.box(y_ground - 1, y_ground + 1, cam.col(X - w / 2 - 0.1, Z), cam.col(X + w / 2 + 0.1, Z))
        if b is not None:
            cv.img[b[0]:b[1], b[2]:b[3]] *= 0.55
        for off in (-w / 2 + 0.05, w / 2 - 0.27):
            self._rect(X + off, X + off + 0.22, 0.0, 0.42, Z, dark, CAR)
        self._rect(X - w / 2, X + w / 2, 0.25, 0.55 * h + 0.2, Z - 0.01, paint, CAR)
        cabin = paint * 0.92
        self._rect(X - 0.44 * w, X + 0.44 * w, 0.55 * h + 0.2, h, Z - 0.01, cabin, CAR)
        glass = _hsv(0.6, 0.15, rng.uniform(0.06, 0.35))
        self._rect(X - 0.38 * w, X + 0.38 * w, 0.6 * h + 0.2, h - 0.07, Z - 0.02, glass, CAR)
        lamp = np.array([200, 20, 25] if rng.random() < 0.7 else [235, 230, 200], F32)
        for off in (-w / 2 + 0.06, w / 2 - 0.3):
            self._rect(X + off, X + off + 0.24, 0.55 * h - 0.05, 0.55 * h + 0.1, Z - 0.02, lamp, CAR)
        self._rect(X - 0.25, X + 0.25, 0.35, 0.47, Z - 0.02, np.array([220, 220, 215], F32), CAR)

    def _draw_parked(self, X: float, Z: float) -> None:
        """A parked car along the kerb: its street-facing side is a plane at lateral X, then its near end."""
        rng, cam, cv = self.rng, self.cam, self.cv
        length, h = rng.uniform(3.8, 4.8), rng.uniform(1.35, 1.65)
        z0, z1 = Z, Z + length
        sg = -1 if X < 0 else 1
        width = rng.uniform(1.65, 1.95)
        paint = _paint_colours(rng, 1)[0] * self.side[sg]["shade"]
        xa, xb = cam.col(X, z0), cam.col(X, z1)
        b = cv.box(cam.row(h, z0) - 1, cam.row(0.0, z0) + 1, min(xa, xb), max(xa, xb))
        if b is not None:
            Zc, Y, ok = cam.side_plane(X, sg, z0, z1, b)
            u = ((Zc - z0) / length)[None, :]  # 0 at the near end, 1 at the far end
            body = (Y >= 0.25) & (Y <= 0.55 * h + 0.2)
            cabin = (Y > 0.55 * h + 0.2) & (Y <= h) & (u > 0.22 + 0.1 * (Y - 0.55 * h) / h) & (u < 0.78)
            wheel = np.zeros_like(body)
            for wc in (0.18, 0.8):
                wheel |= ((u - wc) * length) ** 2 + (Y - 0.33) ** 2 < 0.33**2
            mask = ok[None, :] & (body | cabin | wheel) & (Y >= 0)
            if mask.any():
                glass = _hsv(0.6, 0.15, rng.uniform(0.06, 0.35))
                win = cabin & (Y < h - 0.07) & (u > 0.27) & (u < 0.74)
                col = np.where(win[..., None], glass, paint)
                col = np.where(wheel[..., None], np.array([20, 20, 22], F32), col)
                cv.paint(b, mask, col, CAR, np.broadcast_to(Zc[None, :], mask.shape))
        # the near end (rear or front), a frontal rectangle toward the kerb side
        Xo = X + sg * width
        self._rect(min(X, Xo), max(X, Xo), 0.25, 0.55 * h + 0.2, z0, paint * 0.85, CAR)
        self._rect(min(X, Xo) + 0.1 * width, max(X, Xo) - 0.1 * width, 0.55 * h + 0.2, h, z0, paint * 0.8, CAR)

    # ---------------------------------------------------------------- camera effects
    def hood(self) -> None:
        rng, cam, cv = self.rng, self.cam, self.cv
        if rng.random() >= 0.25:
            return
        depth = rng.uniform(0.06, 0.14) * cam.H
        y0 = int(cam.H - depth)
        xs = (np.arange(cam.W, dtype=F32) + 0.5 - cam.W / 2) / (cam.W / 2)
        top = cam.H - depth * (1.0 - 0.35 * xs * xs)
        yc = np.arange(y0, cam.H, dtype=F32)[:, None] + 0.5
        mask = yc >= top[None, :]
        colour = np.array([25, 25, 30], F32) * rng.uniform(0.7, 3.0)
        shade = (1.0 + 0.4 * (yc - y0) / max(depth, 1.0))
        cv.paint((y0, cam.H, 0, cam.W), mask, colour * shade[..., None] * np.ones((1, cam.W, 1), F32),
                 EGO_VEHICLE, 0.0)

    def finish(self) -> np.ndarray:
        """Haze, vignetting, noise, blur, then exposure / white balance / gamma through one uint8 look-up."""
        rng, cam, cv = self.rng, self.cam, self.cv
        img = cv.img
        if rng.random() < 0.5:
            beta = rng.uniform(0.003, 0.02)
            t = np.exp(-beta * cv.depth)[..., None]
            img = img * t + self.haze_rgb * (1.0 - t)
        if rng.random() < 0.4:
            yy = (np.arange(cam.H, dtype=F32)[:, None] - cam.H / 2) / cam.H
            xx = (np.arange(cam.W, dtype=F32)[None, :] - cam.W / 2) / cam.W
            img = img * (1.0 - rng.uniform(0.3, 0.8) * (xx * xx + yy * yy))[..., None]
        sigma = rng.uniform(1.0, 9.0)
        noise = rng.standard_normal((cam.H, cam.W), dtype=F32)[..., None] * sigma
        img = img + noise
        if rng.random() < 0.3:  # slight defocus or motion blur
            img = img.copy()
            img[:, 1:-1] = (img[:, :-2] + img[:, 1:-1] + img[:, 2:]) / 3.0
            if rng.random() < 0.5:
                img[1:-1] = (img[:-2] + img[1:-1] + img[2:]) / 3.0
        out = np.clip(img, 0, 255).astype(np.uint8)
        gamma = rng.uniform(0.75, 1.3)
        gain = rng.uniform(0.7, 1.3) * rng.uniform(0.92, 1.08, 3)
        levels = np.arange(256, dtype=np.float64)[None, :] / 255.0
        lut = (255.0 * np.clip(levels * gain[:, None], 0, 1) ** gamma + 0.5).astype(np.uint8)  # 3×256
        for c in range(3):
            out[..., c] = lut[c][out[..., c]]
        return out


def render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H×W×3 uint8 RGB image, H×W uint8 Cityscapes label ids)."""
    img, lab, _ = render_with_instances(rng, height, width)
    return img, lab


def instance_ids(lab: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Cityscapes ``instanceIds`` (H×W uint16) from label ids and per-pixel object numbers: pixels of a class with
    instances hold ``label id × 1000 + n`` (n = 0, 1, ... per class, in drawing order), all others their label id."""
    out = lab.astype(np.uint16)
    for label in INSTANCE_LABEL_IDS:
        here = (lab == label) & (objects > 0)
        if here.any():
            numbers = np.unique(objects[here])  # sorted: drawing order
            out[here] = label * 1000 + np.searchsorted(numbers, objects[here]).astype(np.uint16)
    return out


def render_with_instances(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
    """As :func:`render`, plus the scene's Cityscapes instance ids (H×W uint16, see :func:`instance_ids`); the
    image and labels are the same as :func:`render`'s for the same generator state."""
    s = _Street(rng, height, width)
    s.sky()
    s.ground()
    s.far_facade()
    for sg in (-1, 1):
        s.facade_row(sg, back=True)
    for sg in (-1, 1):
        s.facade_row(sg, back=False)
    s.walls_and_fences()
    s.draw_objects()
    s.hood()
    return s.finish(), s.cv.lab, instance_ids(s.cv.lab, s.cv.inst)


__all__ = ["DRAWN_IDS", "EGO_VEHICLE", "INSTANCE_LABEL_IDS", "instance_ids", "render", "render_with_instances"]
