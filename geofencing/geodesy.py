"""Geodesic helpers: circles on the WGS84 ellipsoid and point-to-area distances in metres.

Everything here works in WGS84 longitude/latitude degrees (GeoJSON axis order). Shapely
itself is planar, so anything that involves metres is geodesic:

* :func:`geodesic_circle` walks ``pyproj.Geod.fwd`` around the centre (vectorised over
  the bearings) and splits the result at the antimeridian / closes it over a pole.
* :class:`LocalFrame` is an azimuthal-equidistant frame centred on an area, in which
  planar shapely distances are geodesic distances to within a documented error bound;
  :func:`within_distance` / :func:`geodesic_distance` use it vectorised over points.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
import pyproj
import shapely
from shapely.geometry.base import BaseGeometry

FloatArray = npt.NDArray[np.float64]

GEOD: Final = pyproj.Geod(ellps="WGS84")
_A: Final = GEOD.a
_E2: Final = GEOD.es

# Conservative lower bounds of the length of one degree on the WGS84 ellipsoid: a degree of
# latitude is >= 110 574 m (at the equator) and a degree of longitude at latitude phi is
# >= 111 319 m * cos(phi). Rounding both down keeps metre->degree conversions an *over*-
# estimate, so bounding-box prefilters never drop a true match.
M_PER_DEG_LAT_MIN: Final = 110_000.0
M_PER_DEG_LON_EQ_MIN: Final = 111_000.0

_M2_PER_DEG2: Final = (math.pi / 180.0 * 6_371_008.8) ** 2  # mean-radius sphere

# A CAP circle larger than a quarter meridian (~10 002 km) would contain both poles or be
# concave on the sphere; such a circle is not a meaningful alert area, so we clamp to this.
MAX_CIRCLE_RADIUS_M: Final = 10_000_000.0

# Projecting an area into a LocalFrame (see .project): edges are first cut to at most
# DENSIFY_DEG degrees, then split further until their image bows less than BOW_M.
DENSIFY_DEG: Final = 0.1
BOW_M: Final = 0.1

WORLD: Final = shapely.box(-180.0, -90.0, 180.0, 90.0)


def wrap_lon(lon: npt.ArrayLike) -> FloatArray:
    """Wrap longitudes into [-180, 180)."""
    return np.asarray((np.asarray(lon, dtype=np.float64) + 180.0) % 360.0 - 180.0)


def polygonal(geom: BaseGeometry | None) -> BaseGeometry | None:
    """The polygonal part of ``geom`` (a Polygon or MultiPolygon), or ``None`` if it has none.

    ``shapely.make_valid`` may return a GeometryCollection mixing polygons with the lines
    or points a collapsed ring degenerates into; only the polygons carry an area.
    """
    if geom is None or geom.is_empty:
        return None
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        return None
    merged = shapely.union_all(parts)
    return None if merged.is_empty else merged


def split_antimeridian(geom: BaseGeometry) -> BaseGeometry:
    """Fold a geometry drawn with longitudes beyond +-180 back into [-180, 180].

    Callers build rings with *unwrapped* longitudes (continuous across the antimeridian,
    e.g. 179.9 -> 180.1); this clips the three 360-degree windows and shifts them home,
    so a circle over the date line becomes a MultiPolygon of two halves.
    """
    xmin, _, xmax, _ = geom.bounds
    if xmin >= -180.0 and xmax <= 180.0:
        return geom
    parts = []
    for shift in (-360.0, 0.0, 360.0):
        window = shapely.box(-180.0 + shift, -90.0, 180.0 + shift, 90.0)
        piece = polygonal(shapely.intersection(geom, window))
        if piece is not None:
            parts.append(shapely.transform(piece, lambda xy, s=shift: xy - np.array([s, 0.0])))
    merged = polygonal(shapely.union_all(parts))
    return geom if merged is None else merged


def geodesic_circle(lon: float, lat: float, radius_m: float, *, segments: int = 64) -> BaseGeometry:
    """A polygon approximating the geodesic circle of ``radius_m`` metres around a point.

    * Vertices come from ``Geod.fwd`` over ``segments`` bearings and are pushed out by
      ``1 / cos(pi / segments)`` so the polygon *circumscribes* the true circle: the straight
      chords never cut inside it (we prefer to over-warn by <= 0.12 % of the radius at 64
      segments rather than miss someone at the edge).
    * A circle crossing the antimeridian is returned as a MultiPolygon split at +-180.
    * A circle containing a pole becomes a polar cap: the ring sorted by longitude and
      closed along the pole's latitude (+-90) across the whole longitude range.
    * ``radius_m`` is clamped to :data:`MAX_CIRCLE_RADIUS_M`.

    Raises ``ValueError`` for a non-finite centre, a latitude outside [-90, 90] or a
    radius that is not a positive finite number.
    """
    if not (math.isfinite(lon) and math.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ValueError(f"invalid circle centre ({lon}, {lat})")
    if not (math.isfinite(radius_m) and radius_m > 0.0):
        raise ValueError(f"circle radius must be positive, got {radius_m}")
    if segments < 8:
        raise ValueError("segments must be >= 8")
    radius_m = min(radius_m, MAX_CIRCLE_RADIUS_M)
    lon = float(wrap_lon(lon))

    # Distance from the centre to each pole along the meridian decides the polar cases.
    _, _, to_north = GEOD.inv(lon, lat, lon, 90.0)
    _, _, to_south = GEOD.inv(lon, lat, lon, -90.0)
    pole = 90.0 if radius_m >= to_north else (-90.0 if radius_m >= to_south else None)
    n = segments if pole is None else max(segments, 256)

    bearings = np.linspace(0.0, 360.0, n, endpoint=False)
    reach = radius_m / math.cos(math.pi / n)
    lons, lats, _ = GEOD.fwd(np.full(n, lon), np.full(n, lat), bearings, np.full(n, reach))
    lons = np.asarray(lons, dtype=np.float64)
    lats = np.clip(np.asarray(lats, dtype=np.float64), -90.0, 90.0)

    if pole is not None:
        return _polar_cap(lons, lats, pole)
    # Unwrap relative to the centre so the ring is continuous, then fold it back.
    unwrapped = lon + wrap_lon(lons - lon)
    ring = shapely.Polygon(np.column_stack([unwrapped, lats]))
    return split_antimeridian(ring)


def _polar_cap(lons: FloatArray, lats: FloatArray, pole: float) -> BaseGeometry:
    """Close a ring that encircles a pole into a lon/lat polygon reaching that pole.

    Each half-meridian leaves a (convex, radius < quarter meridian) cap exactly once, so
    the boundary is a function of longitude: sort by longitude, interpolate the latitude
    where it crosses +-180, and close along the pole edge.
    """
    lons = wrap_lon(lons)
    order = np.argsort(lons)
    lons, lats = lons[order], lats[order]
    # Crossing of the antimeridian between the last point and the first (shifted by 360).
    span = (lons[0] + 360.0) - lons[-1]
    t = 0.0 if span == 0.0 else (180.0 - lons[-1]) / span
    lat_am = float(lats[-1] + t * (lats[0] - lats[-1]))
    ring = np.vstack(
        [
            [[-180.0, lat_am]],
            np.column_stack([lons, lats]),
            [[180.0, lat_am], [180.0, pole], [-180.0, pole]],
        ]
    )
    cap = shapely.make_valid(shapely.Polygon(ring))
    cap = polygonal(cap)
    return WORLD if cap is None else cap


def degree_margins(radius_m: float, max_abs_lat: float) -> tuple[float, float]:
    """Conservative (dlon, dlat) in degrees covering ``radius_m`` around latitudes <= max.

    A geodesic of length ``d`` starting at |latitude| <= phi never reaches beyond
    phi + d/R, and its longitude changes at most ``d / (R cos(phi + d/R))``; we evaluate
    that bound with the rounded-down degree lengths above. Near a pole the longitude margin
    is the whole circle (returned as 360).
    """
    if radius_m <= 0.0:
        return 0.0, 0.0
    dlat = radius_m / M_PER_DEG_LAT_MIN
    reach = min(90.0, abs(max_abs_lat) + dlat)
    cos_reach = math.cos(math.radians(reach))
    if cos_reach < 1e-6:
        return 360.0, dlat
    dlon = radius_m / (M_PER_DEG_LON_EQ_MIN * cos_reach)
    return min(dlon, 360.0), dlat


def approx_area_m2(geoms: npt.ArrayLike) -> FloatArray:
    """Approximate areas in m2 of lon/lat geometries: planar deg2 scaled by cos(centroid
    latitude) on the mean-radius sphere. Within ~1 % for county-sized shapes; meant for
    thresholds (sliver tolerances), not for reporting."""
    arr = np.asarray(geoms, dtype=object)
    lat = shapely.get_y(shapely.centroid(arr))
    scale = _M2_PER_DEG2 * np.cos(np.radians(np.nan_to_num(lat)))
    return np.asarray(shapely.area(arr) * scale, dtype=np.float64)


def covering_boxes(
    geom: BaseGeometry, radius_m: float = 0.0
) -> list[tuple[float, float, float, float]]:
    """Lon/lat boxes (within +-180) covering ``geom`` grown by ``radius_m`` metres.

    The growth uses :func:`degree_margins` at the geometry's highest latitude, so the
    boxes contain every point within ``radius_m`` of ``geom``. A geometry split at the
    antimeridian gets one box per side instead of a globe-wide one, and a grown box that
    spills over +-180 is wrapped into two.
    """
    bounds = shapely.bounds(shapely.get_parts(geom))
    groups = [bounds]
    if bounds[:, 2].max() - bounds[:, 0].min() > 180.0:
        east = (bounds[:, 0] + bounds[:, 2]) >= 0.0
        groups = [b for b in (bounds[east], bounds[~east]) if len(b)]
    dlon, dlat = degree_margins(radius_m, float(np.abs(bounds[:, [1, 3]]).max()))
    boxes: list[tuple[float, float, float, float]] = []
    for g in groups:
        x0, x1 = float(g[:, 0].min()) - dlon, float(g[:, 2].max()) + dlon
        y0 = max(-90.0, float(g[:, 1].min()) - dlat)
        y1 = min(90.0, float(g[:, 3].max()) + dlat)
        if x1 - x0 >= 360.0:
            boxes.append((-180.0, y0, 180.0, y1))
        elif x0 < -180.0:
            boxes += [(x0 + 360.0, y0, 180.0, y1), (-180.0, y0, x1, y1)]
        elif x1 > 180.0:
            boxes += [(-180.0, y0, x1 - 360.0, y1), (x0, y0, 180.0, y1)]
        else:
            boxes.append((x0, y0, x1, y1))
    return boxes


def area_centre(geom: BaseGeometry) -> tuple[float, float]:
    """A (lon, lat) centre for ``geom`` that is sensible across the antimeridian.

    A geometry split at +-180 (e.g. the Aleutians) has a planar centroid near lon 0; we
    also try with negative longitudes shifted by +360 and keep whichever frame is narrower.
    """
    xmin, _, xmax, _ = geom.bounds
    if xmax - xmin > 180.0:
        shifted = shapely.transform(
            geom, lambda xy: np.where(xy[:, :1] < 0.0, xy + np.array([360.0, 0.0]), xy)
        )
        sxmin, _, sxmax, _ = shifted.bounds
        if sxmax - sxmin < xmax - xmin:
            c = shifted.centroid
            return float(wrap_lon(c.x)), float(c.y)
    c = geom.centroid
    return float(c.x), float(c.y)


class LocalFrame:
    """Azimuthal-equidistant frame (metres) centred on ``(lon0, lat0)``.

    Implementation: the *spherical* azimuthal-equidistant projection on the unit sphere
    (the formulas of PROJ's ``+proj=aeqd +R=1``, evaluated in numpy), then x scaled by the
    ellipsoid's prime-vertical radius N(lat0) and y by its meridional radius M(lat0). At the
    centre this reproduces the WGS84 metric exactly; away from it the relative distance
    error is about ``rho**2 / (6 R**2) + e**2 * rho / R`` for points ``rho`` from the
    centre: ~1e-4 within 100 km (a county: < 1 m on a 10 km radius) and ~2e-3 within
    600 km (a large state: ~10 m on 5 km). Why not PROJ's ellipsoidal aeqd: it costs
    ~0.7 us a point, and creating a pyproj transformer ~0.1 ms per alert; this costs
    ~0.03 us a point and nothing to create, and the matcher projects thousands of
    candidates per alert.
    """

    def __init__(self, lon0: float, lat0: float) -> None:
        self.lon0 = float(lon0)
        self.lat0 = float(lat0)
        phi0 = math.radians(self.lat0)
        self._sin0, self._cos0 = math.sin(phi0), math.cos(phi0)
        w = math.sqrt(1.0 - _E2 * self._sin0**2)
        self.n_radius = _A / w  # prime vertical: east-west metres per radian at lat0
        self.m_radius = _A * (1.0 - _E2) / w**3  # meridional: north-south

    @classmethod
    def for_geometry(cls, geom: BaseGeometry) -> LocalFrame:
        """A frame centred on ``geom`` (antimeridian-aware, see :func:`area_centre`)."""
        return cls(*area_centre(geom))

    def forward(self, lon: npt.ArrayLike, lat: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Project lon/lat degree arrays to x/y metres."""
        phi = np.radians(np.asarray(lat, dtype=np.float64))
        dlam = np.radians(np.asarray(lon, dtype=np.float64) - self.lon0)
        sin_p, cos_p, cos_l = np.sin(phi), np.cos(phi), np.cos(dlam)
        # Unit vector components: u = east, v = north (seen from the centre), so that
        # hypot(u, v) = sin(c) and the dot product = cos(c) for angular distance c.
        u = cos_p * np.sin(dlam)
        v = self._cos0 * sin_p - self._sin0 * cos_p * cos_l
        sin_c = np.hypot(u, v)
        c = np.arctan2(sin_c, self._sin0 * sin_p + self._cos0 * cos_p * cos_l)
        k = np.divide(c, sin_c, out=np.ones_like(c), where=sin_c > 0.0)
        return k * u * self.n_radius, k * v * self.m_radius

    def forward_unit(
        self, ux: FloatArray, uy: FloatArray, uz: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """:meth:`forward` of points given as unit vectors (see :func:`unit_vectors`).

        The same formulas with the trigonometry of the points done once, ahead of time:
        the matcher stores every place's unit vector and projects thousands per query.
        """
        lam0 = math.radians(self.lon0)
        sl, cl = math.sin(lam0), math.cos(lam0)
        u = uy * cl - ux * sl  # cos(lat) sin(lon - lon0)
        q = ux * cl + uy * sl  # cos(lat) cos(lon - lon0)
        v = self._cos0 * uz - self._sin0 * q
        sin_c = np.hypot(u, v)
        c = np.arctan2(sin_c, self._sin0 * uz + self._cos0 * q)
        k = np.divide(c, sin_c, out=np.ones_like(c), where=sin_c > 0.0)
        return k * u * self.n_radius, k * v * self.m_radius

    def project(self, geom: BaseGeometry) -> BaseGeometry:
        """Project ``geom`` into the frame, its edges following their lon/lat course.

        Shapely (and so every inside test here) treats an edge as straight in lon/lat.
        Projecting only the vertices would turn it into a straight line in the frame,
        i.e. roughly a geodesic, which bows poleward of a lon/lat-straight edge (23 m for
        a 0.5-degree edge along the 65th parallel; it grows with the edge length squared).
        So edges are cut to DENSIFY_DEG (0.1 degree), and then each piece whose image
        bows more than BOW_M (0.1 m) - measured at its midpoint: its lon/lat midpoint's
        image against the chord - is split evenly into ``ceil(sqrt(bow / BOW_M))``
        pieces (the bow of a short arc falls with the square of its length). East-west
        edges at mid latitudes are split ~4x; north-south ones (meridians are geodesics)
        are left alone. Polygonal geometries only; anything else is cut to 0.02 degree,
        which bounds the bow by 5 cm (L^2 tan(lat) / 8R for an edge of L metres).
        """
        geom = shapely.segmentize(geom, DENSIFY_DEG)
        if geom.geom_type in ("Polygon", "MultiPolygon") and not geom.is_empty:
            return self._project_polygonal(geom)

        def _fwd(xy: FloatArray) -> FloatArray:
            x, y = self.forward(xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])

        return shapely.transform(shapely.segmentize(geom, 0.02), _fwd)

    def _project_polygonal(self, geom: BaseGeometry) -> BaseGeometry:
        """:meth:`project` for a Polygon or MultiPolygon (rings rebuilt from arrays)."""
        parts = shapely.get_parts(geom)
        rings, owner = shapely.get_rings(parts, return_index=True)
        xy, ring = shapely.get_coordinates(rings, return_index=True)
        fx, fy = self.forward(xy[:, 0], xy[:, 1])
        i = np.flatnonzero(ring[1:] == ring[:-1])  # edge i runs from vertex i to i + 1
        a, b = xy[i], xy[i + 1]
        mx, my = self.forward((a[:, 0] + b[:, 0]) / 2.0, (a[:, 1] + b[:, 1]) / 2.0)
        ax, ay, dx, dy = fx[i], fy[i], fx[i + 1] - fx[i], fy[i + 1] - fy[i]
        length = np.hypot(dx, dy)
        cross = np.abs(dx * (my - ay) - dy * (mx - ax))
        bow = cross / np.where(length > 0.0, length, np.inf)  # midpoint's offset from chord
        pieces = np.maximum(np.ceil(np.sqrt(bow / BOW_M)), 1.0).astype(np.int64)
        if pieces.max() > 1:
            # Split edge i into pieces[i]: vertex i then the interior cut points.
            count = np.ones(len(xy), dtype=np.int64)
            count[i] = pieces
            at = np.repeat(np.arange(len(xy)), count)
            step = np.arange(len(at)) - np.repeat(np.cumsum(count) - count, count)
            cut = np.flatnonzero(step)
            frac = step[cut] / count[at[cut]]
            lonlat = xy[at[cut]] + frac[:, None] * (xy[at[cut] + 1] - xy[at[cut]])
            cx, cy = self.forward(lonlat[:, 0], lonlat[:, 1])
            fx, fy, ring = fx[at], fy[at], ring[at]
            fx[cut], fy[cut] = cx, cy
        out = shapely.polygons(shapely.linearrings(np.column_stack([fx, fy]), indices=ring),
                               indices=owner)
        if geom.geom_type == "MultiPolygon":
            return shapely.multipolygons(out)
        return out[0]


def unit_vectors(lon: npt.ArrayLike, lat: npt.ArrayLike) -> tuple[FloatArray, ...]:
    """Unit vectors (x towards lon 0, y towards lon 90E, z north) of lon/lat degrees."""
    phi = np.radians(np.asarray(lat, dtype=np.float64))
    lam = np.radians(np.asarray(lon, dtype=np.float64))
    cos_p = np.cos(phi)
    return cos_p * np.cos(lam), cos_p * np.sin(lam), np.sin(phi)


def geodesic_distance(
    geom: BaseGeometry, lon: npt.ArrayLike, lat: npt.ArrayLike, *, frame: LocalFrame | None = None
) -> FloatArray:
    """Distance in metres from each point to ``geom`` (0 inside), vectorised.

    Both are projected into a :class:`LocalFrame` centred on ``geom`` and measured with
    ``shapely.distance``; see :class:`LocalFrame` for the error bound.
    """
    frame = frame or LocalFrame.for_geometry(geom)
    x, y = frame.forward(lon, lat)
    return np.asarray(shapely.distance(frame.project(geom), shapely.points(x, y)))


def within_distance(
    geom: BaseGeometry,
    lon: npt.ArrayLike,
    lat: npt.ArrayLike,
    radius_m: npt.ArrayLike,
    *,
    frame: LocalFrame | None = None,
) -> npt.NDArray[np.bool_]:
    """Whether each point lies within its ``radius_m`` of ``geom`` (inclusive), vectorised."""
    frame = frame or LocalFrame.for_geometry(geom)
    x, y = frame.forward(lon, lat)
    projected = frame.project(geom)
    shapely.prepare(projected)
    return np.asarray(
        shapely.dwithin(projected, shapely.points(x, y), np.asarray(radius_m, dtype=np.float64))
    )
