"""A procedural thorax for synthetic chest CT: anatomy, airways, vessels and nodules in
world coordinates, rasterised in Hounsfield units and sampled through any slice geometry
(with `brain_phantom.sample_volume`: trilinear, averaged over the slice thickness).

World coordinates are DICOM patient coordinates (LPS: +x patient left, +y posterior,
+z head), in mm. A `Thorax` is described relative to its centre (the lungs' mid-height,
in-plane the body's centre); `centre_lps` places it in the world, and is far from the
origin for some patients, as table positions make it.

Anatomy (HU): air outside (-1000); an elliptic body of subcutaneous fat (-100) over
muscle (40); ribs (bands sloping down anteriorly, 400-1000), a sternum and a vertebral
column with discs and a spinal canal; the thoracic cavity: mediastinum (soft tissue 30,
anterior fat -90), heart (40), descending aorta (40), two lungs (-850 with smooth
texture and a posterior, gravity-dependent rise); trachea and main/lobar bronchi (air
tubes with soft-tissue walls); branching vessel trees (40, tapering from the hila
outward; in cross-section a vessel looks like a nodule: the false-positive bait); a
CT table below the patient.

Nodules (`Nodule`): "solid" (a lobulated ellipsoid, 0-80 HU), "part_solid" (ground glass
about -500 around a solid core 0.3-0.6 of the diameter), "juxtapleural" (solid, touching
the chest wall), inside the lungs; and look-alikes that are excluded from scoring:
"small" (solid, under 3 mm) and "calcified" (dense granulomas, 200-700 HU).
Edges are linear ramps one grid voxel wide (partial volume).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from radflow.synth.brain_phantom import Phantom, _inside, _random_rotation, _smooth_noise

AIR_HU, FAT_HU, MUSCLE_HU, SOFT_HU, BLOOD_HU = -1000.0, -100.0, 40.0, 30.0, 40.0
NODULE_KINDS = ("solid", "part_solid", "juxtapleural")
EXCLUDED_KINDS = ("small", "calcified")
TABLE_GAP_MM, TABLE_MM = 12.0, 8.0  # below the patient's back


@dataclass(frozen=True)
class Thorax:
    """Patient-specific anatomy. Lengths in mm, positions relative to the centre."""

    centre_lps: tuple[float, float, float]
    body_mm: tuple[float, float]  # semi-axes of the body ellipse: LR, AP
    fat_mm: float
    muscle_mm: float
    rib_mm: float  # radial thickness of the rib layer
    rib_period_mm: float
    rib_width_mm: float
    rib_hu: float
    lung_height_mm: float  # apex to base
    lung_hu: float
    spine_radius_mm: float
    trachea_radius_mm: float
    carina_z_mm: float
    heart: tuple[float, ...]  # centre x, y, z and semi-axes, mm
    texture_seed: int
    vessel_seed: int

    @property
    def wall_mm(self) -> float:
        return self.fat_mm + self.muscle_mm + self.rib_mm + 2.0

    @property
    def cavity_mm(self) -> tuple[float, float]:
        return (self.body_mm[0] - self.wall_mm, self.body_mm[1] - self.wall_mm)

    @property
    def spine_y_mm(self) -> float:
        return self.cavity_mm[1] - self.spine_radius_mm + 6

    @property
    def trachea_y_mm(self) -> float:
        return self.spine_y_mm - self.spine_radius_mm - self.trachea_radius_mm - 14

    def hilum(self, side: int) -> np.ndarray:
        return np.array([side * 48.0, self.trachea_y_mm + 8, self.carina_z_mm - 30])


@dataclass(frozen=True)
class Nodule:
    """A finding: `centre_lps` (world mm), nominal `diameter_mm`, `kind` (NODULE_KINDS or
    EXCLUDED_KINDS), its HU, the part-solid core's share of the diameter, semi-axis ratios,
    rotation, and lobulation waves (direction x, y, z, phase, amplitude)."""

    centre_lps: tuple[float, float, float]
    diameter_mm: float
    kind: str
    hu: float
    core_fraction: float
    axis_ratios: tuple[float, float, float]
    rotation: tuple[float, ...]
    lobes: tuple[tuple[float, float, float, float, float], ...]


@dataclass(frozen=True)
class Tube:
    """A tapering cylinder from `start` to `end` (mm relative to the thorax centre)."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius_start_mm: float
    radius_end_mm: float


# ---------------------------------------------------------------------------- drawing
def sample_thorax(rng: np.random.Generator) -> Thorax:
    body = (rng.uniform(125, 150), rng.uniform(88, 112))
    lung_height = rng.uniform(220, 270)
    odd = rng.random() < 0.3  # table positions far from the scanner's origin
    centre = (
        rng.normal(0, 6),
        rng.uniform(60, 190) if odd else rng.uniform(-20, 40),
        rng.uniform(-600, -250) if odd else rng.uniform(-200, 60),
    )
    heart_z = -lung_height / 2 + rng.uniform(50, 70)
    return Thorax(
        centre_lps=centre,
        body_mm=body,
        fat_mm=rng.uniform(5, 20),
        muscle_mm=rng.uniform(8, 14),
        rib_mm=rng.uniform(7, 10),
        rib_period_mm=rng.uniform(26, 34),
        rib_width_mm=rng.uniform(9, 12),
        rib_hu=rng.uniform(400, 700),
        lung_height_mm=lung_height,
        lung_hu=rng.uniform(-880, -820),
        spine_radius_mm=rng.uniform(15, 19),
        trachea_radius_mm=rng.uniform(8, 10.5),
        carina_z_mm=rng.uniform(15, 40),
        heart=(rng.uniform(10, 25), -body[1] * 0.3, heart_z, 60.0, 48.0, 55.0),
        texture_seed=int(rng.integers(2**31)),
        vessel_seed=int(rng.integers(2**31)),
    )


def _ellipse_depth(q1, q2, a: float, b: float):
    """Depth (mm, along the ray from the centre) below an ellipse of semi-axes a, b."""
    r = np.sqrt(q1 * q1 + q2 * q2)
    rho = np.maximum(np.sqrt((q1 / a) ** 2 + (q2 / b) ** 2), 1e-6)
    return r / rho - r


def _ellipsoid_depth(q, centre, semi):
    """(1 - rho) * the smallest semi-axis: a signed depth inside an ellipsoid, mm."""
    rho = np.sqrt(sum(((qd - c) / s) ** 2 for qd, c, s in zip(q, centre, semi, strict=True)))
    return (1 - rho) * min(semi)


def lung_depth_mm(th: Thorax, x, y, z):
    """Signed depth (mm, > 0 inside) in the lungs of points relative to the thorax centre,
    and the depth below the chest wall (the pleura) of the same points."""
    cav_a, cav_b = th.cavity_mm
    pleura = _ellipse_depth(x, y, cav_a, cav_b)
    heart_out = -_ellipsoid_depth((x, y, z), th.heart[:3], th.heart[3:])
    spine_out = np.sqrt(x * x + (y - th.spine_y_mm) ** 2) - th.spine_radius_mm - 4
    aorta_out = np.sqrt((x - 24) ** 2 + (y - th.spine_y_mm + 12) ** 2) - 17
    half = th.lung_height_mm / 2
    depth = None
    for side in (-1, 1):
        # the right lung (x < 0) is higher at the base (the liver below it)
        semi = (cav_a * 0.62, cav_b * 1.05, half * (1.0 if side < 0 else 1.04))
        centre = (side * cav_a * 0.5, 4.0, 6.0 if side < 0 else -2.0)
        profile = _ellipsoid_depth((x, y, z), centre, semi) * 2.5
        mediastinum = side * x - (16 + 10 * np.clip(-(y + 20) / 40, 0, 1))
        one = np.minimum(np.minimum(pleura, profile), mediastinum)
        depth = one if depth is None else np.maximum(depth, one)
    depth = np.minimum(depth, np.minimum(heart_out, np.minimum(spine_out, aorta_out)))
    return depth, pleura


def sample_vessels(th: Thorax, levels: int = 7) -> list[Tube]:
    """Vessel trees from each hilum outward, upward and downward: each branch forks in two
    at 20-45 degrees, 0.72 of its radius, until it leaves the lung."""
    rng = np.random.default_rng(th.vessel_seed)
    tubes: list[Tube] = []
    for side in (-1, 1):
        hilum = th.hilum(side)
        for up, back in ((1.2, -0.5), (1.2, 0.6), (0.3, -0.7), (0.2, 0.7), (-1, -0.5),
                         (-1, 0.6), (-0.4, 0.1)):  # fmt: skip
            direction = np.array([side * 1.0, back + rng.uniform(-0.2, 0.2), up])
            stack = [(hilum, direction / np.linalg.norm(direction), rng.uniform(4.5, 6), 0)]
            while stack:
                start, direction, radius, level = stack.pop()
                length = radius * rng.uniform(5, 8)
                end = start + direction * length
                inside, _ = lung_depth_mm(th, *end)
                if level and float(inside) < 1:
                    continue
                tubes.append(Tube(tuple(start), tuple(end), radius, radius * 0.85))
                if level + 1 >= levels:
                    continue
                for _ in range(2):
                    turn = rng.normal(0, 1, 3)
                    turn -= turn @ direction * direction
                    angle = np.deg2rad(rng.uniform(20, 45))
                    child = direction * np.cos(angle) + turn / np.linalg.norm(turn) * np.sin(angle)
                    stack.append((end, child, radius * 0.72, level + 1))
    return tubes


def airways(th: Thorax, z_top: float) -> list[Tube]:
    """Trachea from `z_top` to the carina, main bronchi to the hila, two lobar bronchi on
    each side (outer wall radius; the lumen is 2 mm narrower, 1 mm in lobar bronchi)."""
    carina = np.array([0.0, th.trachea_y_mm, th.carina_z_mm])
    r = th.trachea_radius_mm
    tubes = [Tube((0.0, th.trachea_y_mm, z_top), tuple(carina), r, r)]
    for side in (-1, 1):
        hilum = th.hilum(side)
        tubes.append(Tube(tuple(carina), tuple(hilum), r * 0.8, r * 0.65))
        for up in (1, -1):
            end = hilum + np.array([side * 25.0, 4.0, up * 45.0])
            tubes.append(Tube(tuple(hilum), tuple(end), r * 0.55, r * 0.35))
    return tubes


def _nodule(rng, centre, diameter, kind) -> Nodule:
    hu = {"calcified": rng.uniform(200, 700), "small": rng.uniform(0, 60)}.get(
        kind, rng.uniform(0, 80)
    )
    ratios = rng.uniform([1.0, 0.75, 0.7], 1.0)
    lobes = []
    for _ in range(int(rng.integers(3, 7))):
        k = rng.standard_normal(3)
        amplitude = 0.0 if kind in EXCLUDED_KINDS else rng.uniform(0.03, 0.1)
        lobes.append((*(k / np.linalg.norm(k) * rng.uniform(2, 4)), rng.uniform(0, 6.3), amplitude))
    return Nodule(
        centre_lps=tuple(float(c) for c in centre),
        diameter_mm=float(diameter),
        kind=kind,
        hu=float(hu),
        core_fraction=rng.uniform(0.3, 0.6) if kind == "part_solid" else 1.0,
        axis_ratios=tuple(ratios / np.prod(ratios) ** (1 / 3)),
        rotation=tuple(_random_rotation(rng).ravel()),
        lobes=tuple(lobes),
    )


def sample_nodules(
    rng: np.random.Generator,
    th: Thorax,
    kinds: list[str],
    diameters_mm: list[float],
    in_view,
) -> list[Nodule]:
    """Nodules of `kinds` and `diameters_mm` inside the lungs, apart from each other; a
    juxtapleural one touches the chest wall. `in_view(point_lps, margin_mm)` says whether
    a point lies inside the imaged volume at least margin_mm from its edge."""
    placed: list[Nodule] = []
    cav_a, cav_b = th.cavity_mm
    half = th.lung_height_mm / 2
    for kind, diameter in zip(kinds, diameters_mm, strict=True):
        radius = diameter / 2
        for _attempt in range(20_000):
            q = rng.uniform([-cav_a, -cav_b, -half], [cav_a, cav_b, half])
            depth, pleura = (float(v) for v in lung_depth_mm(th, *q))
            if kind == "juxtapleural":
                ok = 0.15 * radius < depth < 0.6 * radius and pleura < radius + 1
            else:
                ok = depth > radius + 2
            centre = q + th.centre_lps
            if not ok or not in_view(centre, radius + 2):
                continue
            if any(np.linalg.norm(centre - n.centre_lps) < radius + n.diameter_mm / 2 + 5
                   for n in placed):  # fmt: skip
                continue
            placed.append(_nodule(rng, centre, diameter, kind))
            break
        else:
            raise ValueError(f"could not place a {diameter:.1f} mm {kind} nodule in the lungs")
    return placed


# ------------------------------------------------------------------------ rasterising
class _Grid:
    """An axis-aligned grid over the body (and table) and the z range `z_lps`; `axes[d]`
    are voxel coordinates relative to the thorax centre, mm."""

    def __init__(self, th: Thorax, spacing_mm: float, z_lps: tuple[float, float]):
        a, b = th.body_mm
        lo = np.array([-a - 6, -b - 6, z_lps[0] - th.centre_lps[2]])
        hi = np.array([a + 6, b + TABLE_GAP_MM + TABLE_MM + 6, z_lps[1] - th.centre_lps[2]])
        self.shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
        self.spacing_mm = spacing_mm
        self.origin_lps = lo + np.asarray(th.centre_lps)
        self.axes = [(lo[d] + spacing_mm * np.arange(n)).astype(np.float32)
                     for d, n in enumerate(self.shape)]  # fmt: skip

    def coords(self, box=(slice(None),) * 3):
        x, y, z = (axis[b] for axis, b in zip(self.axes, box, strict=True))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def box(self, lo_mm, hi_mm) -> tuple[slice, ...]:
        return tuple(
            slice(int(np.searchsorted(axis, lo)), int(np.searchsorted(axis, hi, side="right")))
            for axis, lo, hi in zip(self.axes, lo_mm, hi_mm, strict=True)
        )


def _tube_fractions(grid: _Grid, tubes: list[Tube], shrink_mm: float = 0.0) -> np.ndarray:
    """Partial-volume fraction inside the union of `tubes` (radii less `shrink_mm`)."""
    g = grid.spacing_mm
    out = np.zeros(grid.shape, np.float32)
    for tube in tubes:
        a, b = np.array(tube.start), np.array(tube.end)
        reach = max(tube.radius_start_mm, tube.radius_end_mm) + 2 * g
        box = grid.box(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if any(s.stop <= s.start for s in box):
            continue
        x, y, z = grid.coords(box)
        axis = b - a
        t = np.clip(((x - a[0]) * axis[0] + (y - a[1]) * axis[1] + (z - a[2]) * axis[2])
                    / float(axis @ axis), 0, 1)  # fmt: skip
        dist = np.sqrt((x - a[0] - t * axis[0]) ** 2 + (y - a[1] - t * axis[1]) ** 2
                       + (z - a[2] - t * axis[2]) ** 2)  # fmt: skip
        radius = tube.radius_start_mm + t * (tube.radius_end_mm - tube.radius_start_mm)
        np.maximum(out[box], _inside(radius - shrink_mm - dist, g), out=out[box])
    return out


def _nodule_fraction(grid: _Grid, th: Thorax, nodule: Nodule, size_share: float = 1.0):
    """(box, fraction inside) of a nodule's lobulated ellipsoid scaled by `size_share`."""
    g = grid.spacing_mm
    centre = np.asarray(nodule.centre_lps) - th.centre_lps
    radius = nodule.diameter_mm / 2 * size_share
    reach = radius * max(nodule.axis_ratios) * 1.35 + 2 * g
    box = grid.box(centre - reach, centre + reach)
    x, y, z = grid.coords(box)
    offsets = np.stack(np.broadcast_arrays(x - centre[0], y - centre[1], z - centre[2]), -1)
    local = offsets @ np.asarray(nodule.rotation, np.float32).reshape(3, 3)
    rho = np.sqrt(((local / np.asarray(nodule.axis_ratios, np.float32)) ** 2).sum(-1)) / radius
    unit = local / np.maximum(np.linalg.norm(local, axis=-1, keepdims=True), 1e-6)
    bump = sum(amp * np.cos(unit @ np.array([kx, ky, kz], np.float32) + phase)
               for kx, ky, kz, phase, amp in nodule.lobes)  # fmt: skip
    return box, _inside((1 + bump - rho) * radius, g)


def build_phantom(
    th: Thorax, nodules: list[Nodule], spacing_mm: float, z_lps: tuple[float, float]
) -> Phantom:
    """Rasterise the thorax between world z `z_lps` on a grid of `spacing_mm`. The
    returned `Phantom.signal["hu_plus_1000"]` holds HU + 1000, so that sampling outside
    the grid (0) reads as air."""
    grid = _Grid(th, spacing_mm, z_lps)
    g = spacing_mm
    texture = np.random.default_rng(th.texture_seed)
    x, y, z = grid.coords()
    a, b = th.body_mm
    # the body: fat, then muscle, ribs and sternum in the wall
    body_depth = _ellipse_depth(x, y * np.where(y > 0, 1.08, 1.0), a, b).astype(np.float32)
    hu = AIR_HU + (FAT_HU - AIR_HU) * _inside(body_depth, g)
    hu += (MUSCLE_HU - FAT_HU) * _inside(body_depth - th.fat_mm, g)
    hu = np.broadcast_to(hu, grid.shape).copy()  # the same in every slice so far
    rib_layer = _inside(body_depth - th.fat_mm - th.muscle_mm, g) - _inside(
        body_depth - th.fat_mm - th.muscle_mm - th.rib_mm, g
    )
    # ribs are hoops sloping down anteriorly: their height falls along the arc
    phase = (z + 45 * np.arctan2(y, np.abs(x) + 1e-3)) / th.rib_period_mm
    band = _inside(th.rib_width_mm / 2 - np.abs(phase - np.round(phase)) * th.rib_period_mm, g)
    ribs = rib_layer * band * _inside(np.abs(x) - 22, g)  # not across the sternum
    cartilage = np.clip(-(y + b * 0.55) / 15, 0, 1)  # anterior ends: costal cartilage
    hu += ribs * ((th.rib_hu - MUSCLE_HU) * (1 - cartilage) + (150 - MUSCLE_HU) * cartilage)
    hu += rib_layer * _inside(18 - np.abs(x), g) * (y < 0) * (350 - MUSCLE_HU)  # sternum
    del band, ribs, rib_layer, phase
    cavity = _inside(body_depth - th.wall_mm, g)
    del body_depth
    mediastinal_fat = _inside(-(y + b * 0.35), g) * _inside(30 - np.abs(x), g)
    hu += cavity * (SOFT_HU - MUSCLE_HU + (-90 - SOFT_HU) * mediastinal_fat)
    del mediastinal_fat
    # spine: vertebral body with discs, canal behind it
    spine_r = np.sqrt(x * x + (y - th.spine_y_mm) ** 2)
    disc = np.abs(np.mod(z, 26.0) - 13) < 2.5
    vertebra = _inside(th.spine_radius_mm - spine_r, g)
    cortex = vertebra - _inside(th.spine_radius_mm - 2 - spine_r, g)
    spine_hu = np.where(disc, np.float32(80), np.float32(280)) + cortex * (500 * ~disc)
    hu = hu * (1 - vertebra) + vertebra * spine_hu
    canal_r = np.sqrt(x * x + (y - th.spine_y_mm - th.spine_radius_mm - 9) ** 2)
    arch = _inside(15 - canal_r, g) * (1 - disc)
    hu = hu * (1 - arch) + arch * 600 + _inside(7 - canal_r, g) * (1 - disc) * (20 - 600)
    del spine_r, vertebra, cortex, spine_hu, canal_r, arch
    # the lungs, with texture and a posterior (dependent) rise, and their vessels
    lung_depth, _ = lung_depth_mm(th, x, y, z)
    lung = _inside(lung_depth, g) * cavity
    del lung_depth, cavity
    lung_hu = th.lung_hu + 25 * _smooth_noise(texture, grid.shape, 2.5 / g)
    lung_hu += 40 * np.clip(y / b, 0, 1) ** 2
    vessels = _tube_fractions(grid, sample_vessels(th))
    lung_hu += (BLOOD_HU - lung_hu) * vessels
    del vessels
    hu += lung * (lung_hu - hu)
    del lung_hu, lung
    # airways: soft-tissue wall, air lumen (inside the body only)
    tubes = airways(th, float(grid.axes[2][-1]) + 5)
    wall, lumen = _tube_fractions(grid, tubes), _tube_fractions(grid, tubes, shrink_mm=1.5)
    hu += (SOFT_HU - hu) * wall
    hu += (AIR_HU - hu) * lumen
    del wall, lumen
    # the CT table below the patient
    table = _inside(TABLE_MM / 2 - np.abs(y - b - TABLE_GAP_MM - TABLE_MM / 2), g)
    hu += (200 - hu) * table * _inside(a + 10 - np.abs(x), g)
    for nodule in nodules:
        if nodule.kind == "part_solid":
            box, ground_glass = _nodule_fraction(grid, th, nodule)
            hu[box] += (-500 - hu[box]) * ground_glass * 0.9
        box, solid = _nodule_fraction(grid, th, nodule, nodule.core_fraction)
        hu[box] += (nodule.hu - hu[box]) * solid
    return Phantom(
        origin_lps=grid.origin_lps, spacing_mm=g, signal={"hu_plus_1000": hu + 1000}, lesions=[]
    )
