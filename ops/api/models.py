"""Request and response models of the HTTP API (pydantic; they make the OpenAPI schema).

Alerts are composed from CAP fields; the area is a GeoJSON polygon, a circle or
gazetteer codes (any combination). The stored :class:`AlertRecord` is what the manager
workflow moves through its states; every view of it says whether it is a real alert
(``is_test``/``status_banner``), because a test that looks live, or a live alert that
looks like a test, is exactly the failure this console exists to prevent.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

CapStatus = Literal["Actual", "Exercise", "Test"]
Severity = Literal["Extreme", "Severe", "Moderate", "Minor", "Unknown"]
Urgency = Literal["Immediate", "Expected", "Future", "Past", "Unknown"]
Certainty = Literal["Observed", "Likely", "Possible", "Unlikely", "Unknown"]
Category = Literal["Geo", "Met", "Safety", "Security", "Rescue", "Fire", "Health", "Env",
                   "Transport", "Infra", "CBRNE", "Other"]
State = Literal["draft", "pending_approval", "approved", "rejected", "sending", "sent",
                "cancelled", "corrected", "failed"]
Kind = Literal["alert", "update", "cancel", "correction"]
LANG = r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$"

BANNERS = {
    "Test": "TEST - not a real alert; reaches only citizens who opted in to tests",
    "Exercise": "EXERCISE - not a real alert; reaches only citizens who opted in to tests",
}


def geojson_problem(data: Any) -> str:
    """What is structurally wrong with a GeoJSON (Multi)Polygon or Feature, or ''.

    Checked before shapely sees it, so a refusal names the problem in GeoJSON terms.
    """
    if isinstance(data, dict) and data.get("type") == "Feature":
        data = data.get("geometry")
    if not isinstance(data, dict):
        return "expected a GeoJSON Polygon or MultiPolygon object (or a Feature with one)"
    kind = data.get("type")
    if kind not in ("Polygon", "MultiPolygon"):
        return f"type must be Polygon or MultiPolygon, not {str(kind)[:30]!r}"
    coords = data.get("coordinates")
    if not isinstance(coords, list) or not coords:
        return f"a {kind} needs coordinates (a list)"
    polygons = [coords] if kind == "Polygon" else coords
    for polygon in polygons:
        if not isinstance(polygon, list) or not polygon:
            return "a polygon is a non-empty list of rings"
        for ring in polygon:
            if not isinstance(ring, list) or len(ring) < 4:
                return "a ring needs at least 4 [lon, lat] positions (the first repeated last)"
            for pos in ring:
                if not (isinstance(pos, list) and 2 <= len(pos) <= 3 and all(
                        isinstance(v, int | float) and not isinstance(v, bool)
                        and math.isfinite(v) for v in pos)):
                    return f"a position is [lon, lat] in finite numbers, not {str(pos)[:40]}"
    return ""


class CircleIn(BaseModel):
    """A circle: centre (WGS84) and radius in kilometres."""

    model_config = ConfigDict(extra="forbid")

    lon: float = Field(ge=-180, le=180)
    lat: float = Field(ge=-90, le=90)
    radius_km: float = Field(gt=0, le=1000)


class AreaIn(BaseModel):
    """The alert area: a drawn polygon, a circle and/or gazetteer codes."""

    model_config = ConfigDict(extra="forbid")

    desc: str = Field(default="", max_length=500, description="area description for people")
    polygon: dict[str, Any] | None = Field(
        default=None, description="GeoJSON Polygon or MultiPolygon (or a Feature), lon/lat"
    )
    circle: CircleIn | None = None
    codes: list[str] = Field(
        default_factory=list, max_length=500,
        description="gazetteer codes: FIPS:06037, SAME:006037, UGC:CAC037",
    )

    @field_validator("polygon")
    @classmethod
    def _geojson(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        problem = geojson_problem(value) if value is not None else ""
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _something(self) -> AreaIn:
        if self.polygon is None and self.circle is None and not self.codes:
            raise ValueError("an area needs a polygon, a circle or at least one zone code")
        return self


class Translation(BaseModel):
    """The alert's text in another language (one more CAP ``<info>`` block)."""

    model_config = ConfigDict(extra="forbid")

    language: str = Field(pattern=LANG)
    event: str = Field(default="", max_length=200)
    headline: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=4000)
    instruction: str = Field(default="", max_length=2000)


class DraftIn(BaseModel):
    """What an originator composes. ``status`` has no default: it must be chosen."""

    model_config = ConfigDict(extra="forbid")

    status: CapStatus
    event: str = Field(min_length=1, max_length=200)
    event_code: str = Field(default="", pattern=r"^([A-Za-z]{3})?$",
                            description="SAME event code, e.g. CEM, EVI, SVR")
    category: Category = "Safety"
    severity: Severity
    urgency: Urgency
    certainty: Certainty
    headline: str = Field(default="", max_length=200)
    description: str = Field(default="", max_length=4000)
    instruction: str = Field(default="", max_length=2000)
    web: str = Field(default="", max_length=500)
    language: str = Field(default="en-US", pattern=LANG)
    translations: list[Translation] = Field(default_factory=list, max_length=10)
    expires: datetime | None = Field(default=None, description="absolute expiry (with zone)")
    expires_in_minutes: int | None = Field(default=None, ge=1, le=7 * 24 * 60,
                                           description="expiry relative to sending")
    area: AreaIn
    note: str = Field(default="", max_length=1000)

    @model_validator(mode="after")
    def _expiry(self) -> DraftIn:
        if self.expires is not None and self.expires.tzinfo is None:
            raise ValueError("expires needs a time zone offset (e.g. 2026-01-01T10:00:00Z)")
        return self


class CapRef(BaseModel):
    """The CAP message a record became when it was sent."""

    identifier: str
    sender: str
    sent: str
    key: str
    msg_type: str
    references: list[str] = Field(default_factory=list)
    expires: str = ""


class HistoryItem(BaseModel):
    """One step of a record's workflow."""

    at: float
    actor: str
    action: str
    detail: str = ""


class AlertRecord(BaseModel):
    """An alert in the manager workflow (draft to sent, and what followed)."""

    id: str
    org: str
    kind: Kind = "alert"
    state: State = "draft"
    draft: DraftIn
    created_by: str
    created_at: float
    editors: list[str] = Field(default_factory=list)
    submitted_by: str = ""
    approved_by: str = ""
    rejected_by: str = ""
    reject_reason: str = ""
    needs_approval: bool = True
    parent: str = Field(default="", description="for updates, cancels, corrections: the root")
    chain: list[str] = Field(default_factory=list,
                             description="root only: ids of the sent alert and its updates")
    followups: list[str] = Field(default_factory=list,
                                 description="root only: cancel/correction record ids")
    cap: CapRef | None = None
    sent_at: float | None = None
    history: list[HistoryItem] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> str:
        """The CAP status: Actual, Exercise or Test."""
        return self.draft.status

    @computed_field  # type: ignore[prop-decorator]
    @property
    def is_test(self) -> bool:
        """True for Test and Exercise: never a real alert."""
        return self.draft.status != "Actual"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status_banner(self) -> str | None:
        """What a screen must show next to a non-Actual alert."""
        return BANNERS.get(self.draft.status)


class RejectIn(BaseModel):
    """Why an approver rejects an alert."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=3, max_length=1000)


class ApproveIn(BaseModel):
    """Approve, and by default send at once (one click for the second person).

    Unknown fields are refused: a misspelt ``"send": false`` must not send the alert.
    """

    model_config = ConfigDict(extra="forbid")

    send: bool = True
    comment: str = Field(default="", max_length=1000)


class CancelIn(BaseModel):
    """A cancellation's text, told to everyone already warned."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="", max_length=1000)


class CorrectionIn(BaseModel):
    """The one-step correction: 'the earlier alert was sent in error'."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(
        default="The earlier alert was sent in error. There is no emergency. "
        "No action is needed.",
        max_length=1000,
    )
