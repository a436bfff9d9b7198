"""Rebuild the simplified gazetteer layers in this directory from ../shared/data/geodata.

The upstream NWS UGC zone layer (16.4 MB) and MeteoAlarm EMMA_ID layer (4.8 MB) are too
big to commit, so we keep simplified copies:

* ``shapely.simplify(..., tolerance, preserve_topology=True)`` with the tolerance below
  (UGC 0.01 deg ~ 1.1 km, EMMA_ID 0.005 deg ~ 0.55 km; the committed US county layer is
  the Census 1:20M generalisation, whose error is of the same order), then
* ``shapely.set_precision(grid=1e-4)`` (~11 m, the upstream precision) which also returns
  a valid geometry, coordinates written with 4 decimals;
* properties reduced to the feature ``id`` (the code) and ``name``.

Run: ``python data/geodata/simplify_layers.py [SHARED_GEODATA_DIR]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import mapping, shape

HERE = Path(__file__).resolve().parent
LAYERS = {  # output name: (upstream file, tolerance in degrees, name property)
    "nws_ugc_zones_simplified.geojson": ("nws_ugc_zones_public_and_marine.geojson", 0.01, "NAME"),
    "meteoalarm_emma_id_simplified.geojson": ("meteoalarm_emma_id_regions.geojson", 0.005, "name"),
}


def _round(coords: Any) -> Any:
    if isinstance(coords, float):
        return round(coords, 4)
    return [_round(c) for c in coords]


def simplify(src: Path, dst: Path, tolerance: float, name_prop: str) -> int:
    """Write a simplified copy of ``src``; return the number of features."""
    doc = json.loads(src.read_bytes())
    features = []
    for f in doc["features"]:
        geom = shapely.simplify(shape(f["geometry"]), tolerance, preserve_topology=True)
        geom = shapely.set_precision(geom, 1e-4)
        if geom.is_empty:
            continue
        m = mapping(geom)
        features.append({"type": "Feature", "id": f["id"],
                         "properties": {"name": f["properties"].get(name_prop)},
                         "geometry": {"type": m["type"], "coordinates": _round(m["coordinates"])}})
    out = {"type": "FeatureCollection", "features": features}
    dst.write_text(json.dumps(out, separators=(",", ":"), ensure_ascii=False) + "\n")
    return len(features)


if __name__ == "__main__":
    shared = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared/data/geodata"
    for out_name, (src_name, tol, prop) in LAYERS.items():
        n = simplify(shared / src_name, HERE / out_name, tol, prop)
        print(f"{out_name}: {n} features, {(HERE / out_name).stat().st_size} bytes")
