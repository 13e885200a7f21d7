"""A procedural head for synthetic brain MR: anatomy and lesions in world coordinates, two
MR contrasts, and the sampling of any slice geometry with partial volume, a bias field and
Rician noise.

World coordinates are DICOM patient coordinates (LPS: +x patient left, +y posterior,
+z head), in mm. A patient's head is rasterised once (`build_phantom`) on an axis-aligned
grid of tissue signals; every series of the patient samples that same grid through its
own geometry (`sample_series`), so two series with different orientations and voxel sizes
show the same continuous head, and the ground truth (`sample_labels`) is the lesion
tissue seen by the reference series' voxels.

Anatomy, from outside in (depth below a wavy scalp surface, in mm): scalp (fat: bright on
T1), skull (cortical bone: dark on both), subarachnoid CSF, a folded grey-matter ribbon
with CSF-filled sulci, white matter; inside: lateral and third ventricles (CSF: dark on
FLAIR after inversion, dark on T1), thalami (deep grey), the interhemispheric fissure.

A lesion is an irregular ellipsoid (its normalised radius perturbed by smoothed noise) of
three nested zones: oedema outermost (bright on FLAIR), a tumour inside it whose rim
enhances (bright on T1-post-contrast) around a necrotic core (dark on T1-post); small
lesions may lack the core. Lesions replace brain parenchyma only (clipped at CSF).

Tissue edges are linear ramps one grid voxel wide, so the grid holds partial-volume
fractions; sampling interpolates it trilinearly and averages sub-samples across the slice
thickness, so a thick slice mixes what lies within it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CONTRASTS = ("flair", "t1post")

#: BraTS 2013-2015 label values of the lesion zones (3 is unused).
NECROSIS, OEDEMA, ENHANCING = 1, 2, 4
LESION_LABELS = (NECROSIS, OEDEMA, ENHANCING)

#: Relative signal of each tissue per contrast (white matter ~0.45 on FLAIR, ~0.65 on T1).
SIGNAL = {
    "flair": {
        "scalp": 0.55,
        "skull": 0.04,
        "csf": 0.06,
        "grey": 0.62,
        "white": 0.44,
        "deep_grey": 0.55,
        "necrosis": 0.62,
        "oedema": 0.95,
        "enhancing": 0.80,
    },
    "t1post": {
        "scalp": 0.95,
        "skull": 0.05,
        "csf": 0.12,
        "grey": 0.45,
        "white": 0.65,
        "deep_grey": 0.52,
        "necrosis": 0.20,
        "oedema": 0.48,
        "enhancing": 1.05,
    },
}
TISSUES = tuple(SIGNAL["flair"])
_ZONES = ("necrosis", "oedema", "enhancing")  # in LESION_LABELS order
_NOISE_CLIP = 3.0  # the boundary noise of a lesion, in standard deviations at most


@dataclass(frozen=True)
class Head:
    """Patient-specific anatomy (fixed across the patient's series). Lengths in mm."""

    centre_lps: tuple[float, float, float]
    radii_mm: tuple[float, float, float]  # semi-axes of the scalp surface: LR, AP, SI
    scalp_mm: float
    skull_mm: float
    csf_mm: float
    cortex_mm: float
    shape_waves: tuple[tuple[float, float, float, float, float], ...]  # kx, ky, kz, phase, mm
    ventricle_scale: float
    signal_jitter: tuple[float, ...]  # per TISSUES entry, multiplicative
    texture_seed: int


@dataclass(frozen=True)
class Lesion:
    """One lesion: nominal equivalent diameter of its outer (oedema) boundary, semi-axis
    ratios (geometric mean 1) and rotation of its ellipsoid, the tumour's and the core's
    size as fractions of the zone outside them (core 0: no necrosis), the amplitude of the
    noise that makes the boundary irregular, and the seed of that noise."""

    centre_lps: tuple[float, float, float]
    diameter_mm: float
    axis_ratios: tuple[float, float, float]
    rotation: tuple[float, ...]  # 3x3, row-major; columns are the ellipsoid's axes (LPS)
    tumour_fraction: float
    core_fraction: float
    irregularity: float
    shape_seed: int

    @property
    def reach_mm(self) -> float:
        """A radius that encloses the lesion whatever its noise."""
        return self.diameter_mm / 2 * max(self.axis_ratios) * (1 + _NOISE_CLIP * self.irregularity)


@dataclass
class LesionCrop:
    """A lesion's zone fractions on a box of the phantom grid (clipped to parenchyma):
    `fractions[z]` for z in LESION_LABELS order, the box starting at grid index `start`."""

    start: tuple[int, int, int]
    fractions: np.ndarray  # (3, nx, ny, nz) float32
    centroid_lps: np.ndarray  # centre of mass of the whole lesion, mm
    volume_ml: float


@dataclass
class Phantom:
    """A patient's head rasterised on an axis-aligned grid: voxel index (a, b, c) lies at
    LPS `origin_lps + spacing_mm * (a, b, c)`; `signal[contrast]` is the noise-free,
    bias-free relative MR signal there."""

    origin_lps: np.ndarray
    spacing_mm: float
    signal: dict[str, np.ndarray]
    lesions: list[LesionCrop]


@dataclass(frozen=True)
class SliceGeometry:
    """A stack of parallel slices, as DICOM describes it. Voxel (k, j, i) = slice k, row j,
    column i lies at LPS `origin_lps + i*col_spacing*row_cosine + j*row_spacing*col_cosine
    + k*slice_step*normal`, normal = row_cosine x col_cosine; `thickness_mm` is the
    excited slab of each slice (<= slice_step_mm: 2D acquisitions may have gaps)."""

    row_cosine: tuple[float, float, float]
    col_cosine: tuple[float, float, float]
    row_spacing_mm: float
    col_spacing_mm: float
    slice_step_mm: float
    thickness_mm: float
    shape: tuple[int, int, int]  # slices, rows, columns
    origin_lps: tuple[float, float, float]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    def index_to_lps(self) -> np.ndarray:
        """4x4 affine from (k, j, i, 1) to LPS mm."""
        affine = np.eye(4)
        affine[:3, 0] = self.normal * self.slice_step_mm
        affine[:3, 1] = np.asarray(self.col_cosine) * self.row_spacing_mm
        affine[:3, 2] = np.asarray(self.row_cosine) * self.col_spacing_mm
        affine[:3, 3] = self.origin_lps
        return affine

    def positions_lps(self) -> np.ndarray:
        """ImagePositionPatient of each slice, (slices, 3)."""
        k = np.arange(self.shape[0])[:, None]
        return np.asarray(self.origin_lps) + k * self.slice_step_mm * self.normal


def rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """The 3x3 rotation by `angle_rad` about `axis` (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * k @ k


# ---------------------------------------------------------------------------- drawing
def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def sample_head(rng: np.random.Generator) -> Head:
    waves = []
    for _ in range(5):
        direction = rng.standard_normal(3)
        k = direction / np.linalg.norm(direction) * rng.uniform(1.5, 3.5)
        waves.append((*map(float, k), float(rng.uniform(0, 2 * np.pi)), rng.uniform(0.5, 2.5)))
    return Head(
        centre_lps=(rng.uniform(-6, 6), rng.uniform(-25, 5), rng.uniform(-30, 30)),
        radii_mm=(rng.uniform(70, 78), rng.uniform(88, 98), rng.uniform(80, 90)),
        scalp_mm=rng.uniform(4, 7),
        skull_mm=rng.uniform(5, 8),
        csf_mm=rng.uniform(1.5, 3),
        cortex_mm=rng.uniform(2.5, 3.5),
        shape_waves=tuple(waves),
        ventricle_scale=rng.uniform(0.75, 1.4),
        signal_jitter=tuple(rng.uniform(0.95, 1.05, len(TISSUES))),
        texture_seed=int(rng.integers(2**31)),
    )


def _offsets(head: Head, points_lps: np.ndarray) -> np.ndarray:
    return np.asarray(points_lps, dtype=float) - np.asarray(head.centre_lps)


def brain_depth_mm(head: Head, points_lps: np.ndarray) -> np.ndarray:
    """Depth of points (..., 3) below the brain surface (negative outside), mm; the smooth
    surface only, without the cortical folding."""
    q = _offsets(head, points_lps)
    return _scalp_depth(head, q[..., 0], q[..., 1], q[..., 2]) - (
        head.scalp_mm + head.skull_mm + head.csf_mm
    )


def _scalp_depth(head: Head, x, y, z):
    """Depth below the wavy scalp surface along the ray from the head centre, mm."""
    a, b, c = head.radii_mm
    r = np.sqrt(x * x + y * y + z * z)
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    r_safe = np.maximum(r, 1e-3)
    surface = r_safe / np.maximum(rho, 1e-6)
    for kx, ky, kz, phase, amplitude in head.shape_waves:
        surface = surface + amplitude * np.cos((kx * x + ky * y + kz * z) / r_safe + phase)
    return surface - r


def sample_lesions(
    rng: np.random.Generator, head: Head, n: int, diameter_mm: tuple[float, float] = (5, 40)
) -> list[Lesion]:
    """`n` non-overlapping lesions inside the brain, nominal diameters log-uniform in
    `diameter_mm`."""
    lesions: list[Lesion] = []
    for _attempt in range(10_000):
        if len(lesions) == n:
            return lesions
        diameter = float(np.exp(rng.uniform(*np.log(diameter_mm))))
        ratios = rng.uniform([1.0, 0.7, 0.6], [1.0, 1.0, 1.0])
        ratios = ratios / np.prod(ratios) ** (1 / 3)
        candidate = Lesion(
            centre_lps=tuple(
                np.asarray(head.centre_lps)
                + rng.uniform(-1, 1, 3) * np.asarray(head.radii_mm) * [0.6, 0.7, 0.55]
            ),
            diameter_mm=diameter,
            axis_ratios=tuple(ratios),
            rotation=tuple(_random_rotation(rng).ravel()),
            tumour_fraction=rng.uniform(0.45, 0.7),
            core_fraction=rng.uniform(0.35, 0.65) if diameter > 12 and rng.random() < 0.8 else 0,
            irregularity=rng.uniform(0.1, 0.25),
            shape_seed=int(rng.integers(2**31)),
        )
        # inside the brain (a big lesion may reach the cortex), clear of the others
        depth = float(brain_depth_mm(head, np.array(candidate.centre_lps)))
        if depth < 0.8 * candidate.reach_mm + 3:
            continue
        centre = np.array(candidate.centre_lps)
        if any(
            np.linalg.norm(centre - o.centre_lps) < candidate.reach_mm + o.reach_mm + 3
            for o in lesions
        ):
            continue
        lesions.append(candidate)
    raise ValueError(f"could not place {n} lesions in the brain")


# ------------------------------------------------------------------------ rasterising
def _inside(signed_mm, width_mm: float):
    """Partial-volume fraction of a voxel whose centre is `signed_mm` inside a surface:
    a linear ramp `width_mm` wide."""
    return np.clip(0.5 + signed_mm / width_mm, 0.0, 1.0)


def _upsample2(coarse: np.ndarray, shape) -> np.ndarray:
    """Linear interpolation of `coarse` onto a grid twice as fine, cropped to `shape`."""
    out = coarse
    for axis, n in enumerate(shape):
        fine = np.repeat(out, 2, axis=axis)
        odd = [slice(None)] * out.ndim
        odd[axis] = slice(1, -1, 2)
        left = [slice(None)] * out.ndim
        left[axis] = slice(0, -1)
        right = [slice(None)] * out.ndim
        right[axis] = slice(1, None)
        fine[tuple(odd)] = (out[tuple(left)] + out[tuple(right)]) / 2
        keep = [slice(None)] * out.ndim
        keep[axis] = slice(0, n)
        out = fine[tuple(keep)]
    return out


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise of unit standard deviation; drawn on a grid twice as
    coarse and interpolated (eight times cheaper, the same look at these widths)."""
    coarse_shape = tuple(int(n) // 2 + 2 for n in shape)
    coarse = ndimage.gaussian_filter(
        rng.standard_normal(coarse_shape, dtype=np.float32), sigma_vox / 2
    )
    coarse /= coarse.std() + 1e-9
    return _upsample2(coarse, shape)


class _Grid:
    """The phantom grid: `axes[d]` are the voxel coordinates along LPS axis d in mm
    relative to the head centre."""

    def __init__(self, head: Head, spacing_mm: float):
        self.spacing_mm = spacing_mm
        half = np.asarray(head.radii_mm) + 8
        self.shape = tuple(int(n) for n in np.ceil(2 * half / spacing_mm).astype(int) + 1)
        self.origin_lps = np.asarray(head.centre_lps) - (np.array(self.shape) - 1) / 2 * (
            spacing_mm
        )
        first = self.origin_lps - np.asarray(head.centre_lps)
        self.axes = [
            np.arange(n, dtype=np.float32) * np.float32(spacing_mm) + np.float32(f)
            for n, f in zip(self.shape, first, strict=True)
        ]

    def box(self, lo_mm, hi_mm) -> tuple[slice, ...]:
        """The voxels between `lo_mm` and `hi_mm` (relative to the head centre)."""
        return tuple(
            slice(int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right")))
            for axis, lo, hi in zip(self.axes, lo_mm, hi_mm, strict=True)
        )

    def coords(self, box=(slice(None),) * 3):
        """x, y, z of the voxels in `box`, shaped to broadcast against each other."""
        x, y, z = (axis[b] for axis, b in zip(self.axes, box, strict=True))
        return x[:, None, None], y[None, :, None], z[None, None, :]


def _ellipsoid_inside(grid: _Grid, centre, radii, bend: float = 0.0):
    """(box, fraction inside) of an axis-aligned ellipsoid (mm, relative to the head
    centre), optionally bent: its SI centre falls by `bend` * (AP offset)^2."""
    centre, radii = np.asarray(centre, float), np.asarray(radii, float)
    margin = 2 * grid.spacing_mm
    lo = centre - radii - margin - [0, 0, bend * radii[1] ** 2]
    box = grid.box(lo, centre + radii + margin)
    x, y, z = grid.coords(box)
    qx, qy = x - centre[0], y - centre[1]
    qz = z - centre[2] + bend * qy * qy
    rho = np.sqrt((qx / radii[0]) ** 2 + (qy / radii[1]) ** 2 + (qz / radii[2]) ** 2)
    return box, _inside((1 - rho) * float(radii.min()), grid.spacing_mm)


def build_phantom(head: Head, lesions: list[Lesion], spacing_mm: float) -> Phantom:
    """Rasterise the head and its lesions on a grid of `spacing_mm` covering the head."""
    grid = _Grid(head, spacing_mm)
    g = spacing_mm
    texture = np.random.default_rng(head.texture_seed)
    depth = _scalp_depth(head, *grid.coords()).astype(np.float32)
    head_in = _inside(depth, g)
    bone_in = _inside(depth - head.scalp_mm, g)
    dura_in = _inside(depth - head.scalp_mm - head.skull_mm, g)
    brain_depth = depth - (head.scalp_mm + head.skull_mm + head.csf_mm)
    del depth
    brain_in = _inside(brain_depth, g)
    # the grey-white boundary undulates (gyri); sulci are thin sheets of CSF where a
    # second noise field crosses zero, within the cortex
    fold = 1.5 * np.clip(_smooth_noise(texture, grid.shape, 4.0 / g), -1.3, 1.3)
    white = _inside(brain_depth - head.cortex_mm - 1.5 * 1.3 - fold, g)
    del fold
    sulcus = np.clip(1 - np.abs(_smooth_noise(texture, grid.shape, 3.0 / g)) / 0.3, 0, 1)
    sulcus *= brain_depth < head.cortex_mm + 6
    del brain_depth
    fractions = {
        "scalp": head_in - bone_in,
        "skull": bone_in - dura_in,
        "csf": dura_in - brain_in,
        "deep_grey": np.zeros(grid.shape, np.float32),
    }
    del head_in, bone_in, dura_in
    grey = brain_in - white
    del brain_in
    fractions["csf"] += grey * sulcus
    grey *= 1 - sulcus
    del sulcus
    fractions["grey"], fractions["white"] = grey, white

    def carve(into: str, box, share):
        """Give `share` of the grey and white matter in `box` to tissue `into`."""
        grey_box, white_box = fractions["grey"][box], fractions["white"][box]
        fractions[into][box] += (grey_box + white_box) * share
        fractions["grey"][box] = grey_box * (1 - share)
        fractions["white"][box] = white_box * (1 - share)

    fissure = grid.box((-3, -200, 23), (3, 200, 200))
    x, _, z = grid.coords(fissure)
    carve("csf", fissure, _inside(1.2 - np.abs(x), g) * _inside(z - 25, g))
    s = head.ventricle_scale
    for side in (-1, 1):
        carve("csf", *_ellipsoid_inside(grid, (7 * s * side, -5, 12), (5 * s, 26, 8 * s), 0.012))
    carve("csf", *_ellipsoid_inside(grid, (0, 0, -2), (1.5 * s, 12, 8)))  # third ventricle
    for side in (-1, 1):
        carve("deep_grey", *_ellipsoid_inside(grid, ((11 + 2 * s) * side, 4, -6), (8, 14, 9)))

    crops = [_rasterise_lesion(lesion, fractions, grid.origin_lps, g) for lesion in lesions]
    signal = {}
    for contrast in CONTRASTS:
        total = np.zeros(grid.shape, dtype=np.float32)
        for tissue, jitter in zip(TISSUES, head.signal_jitter, strict=True):
            if tissue in fractions:
                total += fractions[tissue] * np.float32(SIGNAL[contrast][tissue] * jitter)
        for crop in crops:
            box = _box(crop.start, crop.fractions.shape[1:])
            for zone, fraction in zip(_ZONES, crop.fractions, strict=True):
                jitter = head.signal_jitter[TISSUES.index(zone)]
                total[box] += fraction * np.float32(SIGNAL[contrast][zone] * jitter)
        signal[contrast] = total
    return Phantom(origin_lps=grid.origin_lps, spacing_mm=g, signal=signal, lesions=crops)


def _box(start, shape) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(start, shape, strict=True))


def _rasterise_lesion(lesion: Lesion, fractions: dict, origin: np.ndarray, g: float):
    """Zone fractions of `lesion` on its box of the grid; the parenchyma fractions there
    are reduced by what the lesion takes (in place)."""
    grid_shape = np.array(fractions["grey"].shape)
    centre = (np.asarray(lesion.centre_lps) - origin) / g
    reach = lesion.reach_mm / g + 2
    start = np.clip(np.floor(centre - reach).astype(int), 0, grid_shape)
    stop = np.clip(np.ceil(centre + reach).astype(int) + 1, 0, grid_shape)
    box = _box(start, stop - start)
    axes = [(np.arange(a, b) * g + o - c) for a, b, o, c in zip(
        start, stop, origin, lesion.centre_lps, strict=True)]  # fmt: skip
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)
    rotation = np.asarray(lesion.rotation, dtype=np.float32).reshape(3, 3)
    local = (
        offsets @ rotation / (np.asarray(lesion.axis_ratios, np.float32) * lesion.diameter_mm / 2)
    )
    rho = np.sqrt((local**2).sum(-1))
    shape_rng = np.random.default_rng(lesion.shape_seed)
    sigma = max(lesion.diameter_mm / 8, 1.5) / g
    outer_noise = np.clip(_smooth_noise(shape_rng, rho.shape, sigma), -_NOISE_CLIP, _NOISE_CLIP)
    inner_noise = np.clip(_smooth_noise(shape_rng, rho.shape, sigma * 0.7), -2, 2)
    radius_mm = lesion.diameter_mm / 2
    width = g / radius_mm  # one grid voxel, in units of the normalised radius
    whole = _inside(1 - (rho + lesion.irregularity * outer_noise), width)
    tumour_rho = rho / lesion.tumour_fraction + lesion.irregularity * inner_noise
    tumour = np.minimum(_inside(1 - tumour_rho, width / lesion.tumour_fraction), whole)
    if lesion.core_fraction > 0:
        scale = lesion.tumour_fraction * lesion.core_fraction
        core = _inside(1 - (rho / scale + lesion.irregularity * inner_noise), width / scale)
        core = np.minimum(core, tumour)
    else:
        core = np.zeros_like(tumour)
    parenchyma = fractions["grey"][box] + fractions["white"][box] + fractions["deep_grey"][box]
    zones = np.stack([core, tumour - core, whole - tumour]) * parenchyma
    # LESION_LABELS order: necrosis (core), oedema (outside the tumour), enhancing (rim)
    zones = zones[[0, 2, 1]].astype(np.float32)
    for tissue in ("grey", "white", "deep_grey"):
        fractions[tissue][box] *= 1 - whole
    total = zones.sum(0)
    volume = float(total.sum()) * g**3
    if volume == 0:
        raise ValueError("a lesion fell outside the brain parenchyma")
    centroid = (offsets * total[..., None]).sum((0, 1, 2)) / total.sum()
    return LesionCrop(
        start=tuple(int(s) for s in start),
        fractions=zones,
        centroid_lps=centroid + np.asarray(lesion.centre_lps),
        volume_ml=volume / 1000,
    )


# -------------------------------------------------------------------------- sampling
def _grid_transform(phantom: Phantom, geometry: SliceGeometry):
    """(matrix, offset) mapping series index (k, j, i) to phantom grid index."""
    to_grid = geometry.index_to_lps()
    matrix = to_grid[:3, :3] / phantom.spacing_mm
    offset = (to_grid[:3, 3] - phantom.origin_lps) / phantom.spacing_mm
    return matrix, offset


def _slab_offsets(phantom: Phantom, geometry: SliceGeometry) -> list[np.ndarray]:
    """Grid-index shifts of the sub-samples that average a slice over its thickness: one
    per 1.5 grid voxels (each trilinear sample already spans two)."""
    n = max(1, int(np.ceil(geometry.thickness_mm / (1.5 * phantom.spacing_mm) - 1e-6)))
    along = ((np.arange(n) + 0.5) / n - 0.5) * geometry.thickness_mm
    return [t * geometry.normal / phantom.spacing_mm for t in along]


def _resample(volume: np.ndarray, matrix: np.ndarray, offset: np.ndarray, output_shape):
    """Trilinear samples of `volume` at `matrix @ index + offset` (zero outside). A matrix
    that only permutes and scales axes (axial, sagittal, coronal stacks) takes scipy's
    separable path on a transposed view, about twice as fast as the general one."""
    nonzero = np.abs(matrix) > 1e-12
    if (nonzero.sum(axis=1) == 1).all() and (nonzero.sum(axis=0) == 1).all():
        axes = [int(np.flatnonzero(nonzero[:, d])[0]) for d in range(3)]
        zooms = np.array([matrix[axes[d], d] for d in range(3)])
        return ndimage.affine_transform(
            volume.transpose(axes), zooms, offset[axes], output_shape=output_shape,
            order=1, cval=0.0,
        )  # fmt: skip
    return ndimage.affine_transform(
        volume, matrix, offset, output_shape=output_shape, order=1, cval=0.0
    )


def _sample(volume, matrix, offset, shifts, output_shape) -> np.ndarray:
    total = np.zeros(output_shape, dtype=np.float32)
    for shift in shifts:
        total += _resample(volume, matrix, offset + shift, output_shape)
    return total / len(shifts)


def bias_field(geometry: SliceGeometry, centre_lps, coefficients: np.ndarray) -> np.ndarray:
    """A smooth multiplicative field exp(p) on the series' voxels, p a quadratic polynomial
    of the world position relative to `centre_lps` in units of 100 mm; `coefficients`
    (9,) weigh x, y, z, x^2, y^2, z^2, xy, xz, yz."""
    affine = geometry.index_to_lps()
    n_k, n_j, n_i = geometry.shape
    k = np.arange(n_k, dtype=np.float32)[:, None, None]
    j = np.arange(n_j, dtype=np.float32)[None, :, None]
    i = np.arange(n_i, dtype=np.float32)[None, None, :]
    # float32 throughout: numpy keeps the arrays' precision for Python floats
    a = [[float(v) for v in row] for row in affine[:3]]
    u = [
        (a[d][0] * k + a[d][1] * j + a[d][2] * i + (a[d][3] - float(centre_lps[d]))) / 100
        for d in range(3)
    ]
    terms = [u[0], u[1], u[2], u[0] ** 2, u[1] ** 2, u[2] ** 2, u[0] * u[1], u[0] * u[2],
             u[1] * u[2]]  # fmt: skip
    poly = sum(float(c) * t for c, t in zip(coefficients, terms, strict=True))
    return np.exp(poly).astype(np.float32)


def sample_volume(phantom: Phantom, volume: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """`volume` (on the phantom's grid) at the voxels of `geometry` (slices, rows, columns),
    float32: trilinear, averaged over each slice's thickness, 0 outside the grid."""
    matrix, offset = _grid_transform(phantom, geometry)
    return _sample(volume, matrix, offset, _slab_offsets(phantom, geometry), geometry.shape)


def sample_series(
    phantom: Phantom,
    contrast: str,
    geometry: SliceGeometry,
    bias: np.ndarray,
    noise_sigma: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """The magnitude image (slices, rows, columns) float32 of `contrast` on `geometry`:
    the phantom's signal averaged over each slice's thickness, times `bias`, with Rician
    noise (the magnitude of complex Gaussian noise of `noise_sigma` per channel)."""
    clean = sample_volume(phantom, phantom.signal[contrast], geometry) * bias
    real = clean + noise_sigma * rng.standard_normal(geometry.shape, dtype=np.float32)
    imaginary = noise_sigma * rng.standard_normal(geometry.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def sample_labels(phantom: Phantom, geometry: SliceGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth label map (slices, rows, columns) uint8 on `geometry`: in each
    voxel the zone (LESION_LABELS) or background (0) that fills most of it, with the same
    partial-volume averaging as the images; and which lesion (index into
    `phantom.lesions`, -1 for none) each labelled voxel belongs to. A lesion smaller than
    the voxels, which fills none of them most, is marked on the voxel it fills most (it
    shows there, and an annotator would mark it), with its zone that fills most of it."""
    shape = geometry.shape
    zone_fractions = np.zeros((3, *shape), dtype=np.float32)
    strongest = np.zeros(shape, dtype=np.float32)
    owner = np.full(shape, -1, dtype=np.int8)
    matrix, offset = _grid_transform(phantom, geometry)
    shifts = _slab_offsets(phantom, geometry)
    to_index = np.linalg.inv(geometry.index_to_lps())
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    sampled_boxes = []
    for n, crop in enumerate(phantom.lesions):
        # the series voxels whose slab can touch the crop's box
        size = np.array(crop.fractions.shape[1:])
        corners_lps = phantom.origin_lps + (np.array(crop.start) + corners * (size - 1)) * (
            phantom.spacing_mm
        )
        corners_index = (to_index[:3, :3] @ corners_lps.T).T + to_index[:3, 3]
        lo = np.clip(np.floor(corners_index.min(0)).astype(int) - 1, 0, shape)
        hi = np.clip(np.ceil(corners_index.max(0)).astype(int) + 2, 0, shape)
        if np.any(hi <= lo):
            continue
        box_offset = offset + matrix @ lo - np.array(crop.start)
        box = _box(lo, hi - lo)
        sampled = np.stack(
            [_sample(f, matrix, box_offset, shifts, tuple(hi - lo)) for f in crop.fractions]
        )
        zone_fractions[(slice(None), *box)] += sampled
        total = sampled.sum(0)
        mine = total > strongest[box]
        strongest[box] = np.where(mine, total, strongest[box])
        owner[box] = np.where(mine, n, owner[box])
        sampled_boxes.append((n, lo, sampled))
    background = 1 - zone_fractions.sum(0)
    winner = np.argmax(np.concatenate([background[None], zone_fractions]), axis=0)
    labels = np.array((0, *LESION_LABELS), dtype=np.uint8)[winner]
    owner[labels == 0] = -1
    for n, lo, sampled in sampled_boxes:
        total = sampled.sum(0)
        if (owner == n).any() or total.max() <= 0:
            continue
        inside = np.unravel_index(np.argmax(total), total.shape)
        voxel = tuple(int(a) for a in np.add(lo, inside))
        if owner[voxel] < 0:
            labels[voxel] = LESION_LABELS[int(np.argmax(sampled[(slice(None), *inside)]))]
            owner[voxel] = n
    return labels, owner
