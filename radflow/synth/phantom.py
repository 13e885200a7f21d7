"""A procedural chest-radiograph phantom: anatomy, nodules, exposure and detector noise.

The phantom is drawn as a projected attenuation map ("density", higher = more attenuating
= brighter in MONOCHROME2) in normalised image coordinates u (left->right) and v
(top->bottom), both in [-1, 1] across the detector, then passed through a random
exposure and detector model. Smooth anatomy is evaluated on a coarse grid and upsampled;
nodules and noise are drawn at full resolution.

Label safety: the density map is standardised to zero mean and unit variance over the
whole image before the (label-independent) exposure mapping, so no global intensity
statistic of the stored image depends on whether nodules were drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Anatomy:
    """Patient-specific anatomy, fixed across a patient's studies (normalised units)."""

    body_half_width: float
    lung_half_width: tuple[float, float]  # image-left lung (patient right), image-right lung
    lung_half_height: tuple[float, float]
    lung_centre_u: tuple[float, float]
    lung_top_v: float
    lung_depth: float  # density lost where the lung replaces soft tissue
    heart_half_width: float
    heart_half_height: float
    heart_centre_u: float
    rib_period_v: float
    rib_slope: float
    rib_phase: float
    rib_density: float
    vessel_seed: int
    vessel_density: float


@dataclass(frozen=True)
class Nodule:
    """A solid nodule: centre in normalised (u, v) image coordinates, diameter in mm and
    peak added density relative to the lung depth."""

    u: float
    v: float
    diameter_mm: float
    contrast: float


@dataclass(frozen=True)
class Acquisition:
    """Per-study positioning, exposure and detector parameters."""

    rows: int
    cols: int
    pixel_spacing_mm: float
    shift_u: float
    shift_v: float
    rotation_deg: float
    zoom: float
    scatter: float
    heel: float
    noise: float
    gain: float  # detector units per standard deviation of density
    offset: float  # detector units at mean density
    bits_stored: int
    granulomas: list[tuple[float, float, float]] = field(default_factory=list)  # u, v, mm


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    lung_w = rng.uniform(0.24, 0.31)
    return Anatomy(
        body_half_width=rng.uniform(0.82, 0.98),
        lung_half_width=(lung_w * rng.uniform(0.97, 1.05), lung_w * rng.uniform(0.9, 1.0)),
        lung_half_height=(rng.uniform(0.52, 0.64), rng.uniform(0.5, 0.62)),
        lung_centre_u=(-rng.uniform(0.36, 0.44), rng.uniform(0.35, 0.43)),
        lung_top_v=rng.uniform(-0.78, -0.62),
        lung_depth=rng.uniform(0.55, 0.75),
        heart_half_width=rng.uniform(0.24, 0.33),
        heart_half_height=rng.uniform(0.2, 0.27),
        heart_centre_u=rng.uniform(0.06, 0.16),
        rib_period_v=rng.uniform(0.16, 0.21),
        rib_slope=rng.uniform(0.25, 0.45),
        rib_phase=rng.uniform(0, 1),
        rib_density=rng.uniform(0.1, 0.2),
        vessel_seed=int(rng.integers(2**31)),
        vessel_density=rng.uniform(0.1, 0.18),
    )


def _smoothstep_inside(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, with a logistic edge `softness` wide."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / softness, -50, 50)))


def lung_mask(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Soft lung-field membership in [0, 1] at normalised coordinates (u, v)."""
    fields = []
    for side in (0, 1):
        cu = anatomy.lung_centre_u[side]
        hw = anatomy.lung_half_width[side]
        hh = anatomy.lung_half_height[side]
        cv = anatomy.lung_top_v + hh
        # superellipse: apex rounded, bases wide; the diaphragm domes upward medially
        du = (u - cu) / hw
        dv = (v - cv) / hh
        widen = 0.8 + 0.35 * np.clip(dv + 0.6, 0, None)  # narrow apex, wide base
        exponent = np.where(dv < 0, 2.0, 3.0)
        r = (np.abs(du / widen) ** exponent + np.abs(dv) ** exponent) ** (1 / exponent)
        dome = cv + hh * (0.95 - 0.25 * (1 - np.clip(np.abs(u - cu) / hw, 0, 1)) ** 2)
        inside = _smoothstep_inside(r - 1.0, 0.03) * _smoothstep_inside(v - dome, 0.015)
        fields.append(inside)
    return np.maximum(fields[0], fields[1])


def _anatomy_density(anatomy: Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    body = _smoothstep_inside(
        np.sqrt((u / anatomy.body_half_width) ** 2 + ((v - 0.15) / 1.25) ** 2) - 1.0, 0.02
    )
    density = body.copy()
    lungs = lung_mask(anatomy, u, v)
    density -= anatomy.lung_depth * lungs
    heart_v = anatomy.lung_top_v + 2 * anatomy.lung_half_height[1] - anatomy.heart_half_height
    heart = _smoothstep_inside(
        np.hypot(
            (u - anatomy.heart_centre_u) / anatomy.heart_half_width,
            (v - heart_v) / anatomy.heart_half_height,
        )
        - 1.0,
        0.04,
    )
    density += 0.45 * anatomy.lung_depth * heart * lungs + 0.15 * heart
    spine = _smoothstep_inside(np.abs(u) - 0.07, 0.015) * body
    density += 0.25 * spine * (1 + 0.15 * np.cos(2 * np.pi * v / anatomy.rib_period_v))
    # posterior ribs: bands that slope down laterally and curve; only over the thorax
    rib_coord = v - anatomy.rib_slope * np.abs(u) - 0.45 * u**2
    phase = (rib_coord / anatomy.rib_period_v + anatomy.rib_phase) % 1.0
    rib_band = _smoothstep_inside(np.abs(phase - 0.5) - 0.17, 0.03)
    thorax = _smoothstep_inside(np.abs(u) - 0.85 * anatomy.body_half_width, 0.05)
    thorax *= _smoothstep_inside(v - 0.6, 0.08) * _smoothstep_inside(-0.95 - v, 0.05)
    # ribs show most over aerated lung, faintly through the mediastinum's soft tissue
    density += anatomy.rib_density * rib_band * thorax * (0.35 + 0.65 * lungs)
    # clavicles: two near-horizontal bars above the apices
    for sign in (-1, 1):
        clav_v = anatomy.lung_top_v - 0.04 + 0.18 * (sign * u - 0.3) ** 2
        clav = _smoothstep_inside(np.abs(v - clav_v) - 0.035, 0.01)
        clav *= _smoothstep_inside(np.abs(u - sign * 0.35) - 0.3, 0.03)
        density += 0.3 * clav
    return density


def _vessel_texture(anatomy: Anatomy, shape: tuple[int, int], u, v, lungs) -> np.ndarray:
    """Branching-looking lung markings: ridges of band-passed noise, dense at the hila."""
    rng = np.random.default_rng(anatomy.vessel_seed)
    base = rng.standard_normal((96, 96))
    fine = ndimage.gaussian_filter(base, 1.2) - ndimage.gaussian_filter(base, 3.0)
    fine = ndimage.zoom(fine, (shape[0] / 96, shape[1] / 96), order=1)
    ridges = np.clip(fine / (fine.std() + 1e-9) - 0.5, 0, None)
    hilum = np.minimum(np.hypot(u + 0.2, v + 0.05), np.hypot(u - 0.2, v + 0.05))
    return anatomy.vessel_density * ridges * np.exp(-hilum / 0.45) * lungs


def _render_disc(
    density: np.ndarray, centre_rc: tuple[float, float], radius_px: float, peak: float
) -> None:
    """Add the projection of a sphere (chord length ~ sqrt(R^2 - r^2)) with a soft rim."""
    rows, cols = density.shape
    r0, c0 = centre_rc
    half = int(np.ceil(radius_px * 1.3)) + 2
    r_lo, r_hi = max(0, int(r0) - half), min(rows, int(r0) + half + 1)
    c_lo, c_hi = max(0, int(c0) - half), min(cols, int(c0) + half + 1)
    if r_lo >= r_hi or c_lo >= c_hi:
        return
    rr, cc = np.mgrid[r_lo:r_hi, c_lo:c_hi]
    dist = np.hypot(rr - r0, cc - c0) / radius_px
    profile = np.sqrt(np.clip(1.0 - dist**2, 0, None))
    rim = np.exp(-(((dist - 1.0) / 0.12) ** 2)) * (dist > 1.0)  # partial-volume blur
    density[r_lo:r_hi, c_lo:c_hi] += peak * (profile + 0.15 * rim)


def mm_per_unit(acquisition: Acquisition) -> float:
    """Millimetres of phantom per normalised unit for this acquisition's geometry."""
    return (
        max(acquisition.rows, acquisition.cols)
        / 2
        * acquisition.pixel_spacing_mm
        * acquisition.zoom
    )


def render(
    anatomy: Anatomy,
    acquisition: Acquisition,
    nodules: list[Nodule],
    rng: np.random.Generator,
) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Render one radiograph.

    Returns the detector image as uint16 (rows, cols) in MONOCHROME2 sense (bright = dense),
    within [0, 2**bits_stored - 1], and each nodule's (row_px, col_px, diameter_mm) in
    the stored pixel grid.
    """
    acq = acquisition
    rows, cols = acq.rows, acq.cols
    coarse = (max(rows // 4, 32), max(cols // 4, 32))
    # detector coords -> patient (phantom) coords: undo positioning shift/rotation/zoom.
    # The aspect ratio follows the pixel grid so anatomy is not stretched on non-square
    # detectors: normalise both axes by the larger half-extent.
    half_extent = max(rows, cols) / 2
    theta = np.deg2rad(acq.rotation_deg)

    def detector_to_phantom(r, c):
        y = (r + 0.5 - rows / 2) / half_extent
        x = (c + 0.5 - cols / 2) / half_extent
        x, y = x / acq.zoom - acq.shift_u, y / acq.zoom - acq.shift_v
        cos, sin = np.cos(theta), np.sin(theta)
        return cos * x + sin * y, -sin * x + cos * y

    def phantom_to_detector(pu, pv):
        cos, sin = np.cos(theta), np.sin(theta)
        x, y = cos * pu - sin * pv, sin * pu + cos * pv
        x, y = (x + acq.shift_u) * acq.zoom, (y + acq.shift_v) * acq.zoom
        return y * half_extent + rows / 2 - 0.5, x * half_extent + cols / 2 - 0.5

    rc, cc = np.mgrid[0 : coarse[0], 0 : coarse[1]].astype(np.float64)
    u, v = detector_to_phantom(
        (rc + 0.5) * rows / coarse[0] - 0.5, (cc + 0.5) * cols / coarse[1] - 0.5
    )
    lungs = lung_mask(anatomy, u, v)
    density_coarse = _anatomy_density(anatomy, u, v) + _vessel_texture(anatomy, coarse, u, v, lungs)
    # scatter: a broad, low-contrast haze; heel effect: a vertical exposure gradient
    haze = ndimage.gaussian_filter(rng.standard_normal(coarse), min(coarse) / 6)
    density_coarse += acq.scatter * haze / (haze.std() + 1e-9)
    density = ndimage.zoom(density_coarse, (rows / coarse[0], cols / coarse[1]), order=1)
    density = density[:rows, :cols]
    if density.shape != (rows, cols):  # zoom rounding can leave one row short
        density = np.pad(
            density, ((0, rows - density.shape[0]), (0, cols - density.shape[1])), mode="edge"
        )

    spacing = acq.pixel_spacing_mm
    lesion_marks = []
    for nod in nodules:
        r0, c0 = phantom_to_detector(nod.u, nod.v)
        radius_px = nod.diameter_mm / 2 / spacing
        _render_disc(density, (r0, c0), radius_px, nod.contrast * anatomy.lung_depth)
        lesion_marks.append((float(r0), float(c0), nod.diameter_mm))
    for gu, gv, gmm in acq.granulomas:
        r0, c0 = phantom_to_detector(gu, gv)
        _render_disc(density, (r0, c0), gmm / 2 / spacing, 0.5 * anatomy.lung_depth)

    density += acq.heel * np.linspace(-1, 1, rows)[:, None]
    density = (density - density.mean()) / density.std()
    # quantum noise grows with the signal, plus a little pixel-correlated detector noise
    white = rng.standard_normal((rows, cols)).astype(np.float32)
    correlated = ndimage.uniform_filter(rng.standard_normal((rows, cols)).astype(np.float32), 3)
    level = np.clip(1.2 + 0.35 * density, 0.3, None)
    signal = density + acq.noise * (np.sqrt(level) * white + 1.5 * correlated)
    max_value = 2**acq.bits_stored - 1
    image = np.clip(np.rint(acq.offset + acq.gain * signal), 0, max_value)
    return image.astype(np.uint16), lesion_marks
