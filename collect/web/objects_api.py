"""``/api/v1/objects``: counts and sizes of a segmenting station's objects.

Objects are the identifications a segmenting station sends, one per object of a frame
(``[objects] mode = "segment"``); the store's queries and what is counted how are in
:mod:`fieldscope.collect.store.objects`. Both endpoints take ``device``, ``station``,
``label`` (repeatable; ``(uncertain)`` too), ``sample`` (the id the station's ``sample``
command started), ``since`` and ``until``. A label narrows the objects, not the frames.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from litestar import Router, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import QueryParameter

from fieldscope.collect.store import (
    Filters,
    ObjectGroup,
    SizeDistribution,
)
from fieldscope.collect.store.objects import MAX_BINS
from fieldscope.collect.web.api import Names, Samples, Since, Until, provide_filters
from fieldscope.collect.web.pages import Pages

__all__ = ["router"]

DEFAULT_BINS = 20


class ObjectSummary(msgspec.Struct, frozen=True, kw_only=True):
    """Frames, objects and per-label counts, one group per value of ``by``."""

    by: list[str]
    groups: list[ObjectGroup]


def provide_object_filters(
    *,
    device: Names = None,
    station: Names = None,
    label: Names = None,
    sample: Samples = None,
    since: Since = None,
    until: Until = None,
) -> Filters:
    """The filters of the object endpoints (no status or score: objects are classified);
    a bad one is a 400 naming it."""
    return provide_filters(
        device=device, station=station, label=label, sample=sample, since=since, until=until
    )


@get("/summary", sync_to_thread=True)
def object_summary(
    state: State,
    filters: NamedDependency[Filters],
    by: Annotated[
        list[Literal["station", "device", "sample"]] | None,
        QueryParameter(
            description="group by station, device and/or sample (repeatable); "
            "objects taken between samples have the sample ''"
        ),
    ] = None,
) -> ObjectSummary:
    """Per group: frames (those without objects included), objects, objects per frame,
    the frames' size rejections, and per label the objects and their ESD in µm."""
    pages: Pages = state.pages
    group: list[str] = list(dict.fromkeys(by or ()))
    with pages.store() as store:
        groups = store.object_summary(filters, group)
    return ObjectSummary(by=group, groups=groups)


@get("/sizes", sync_to_thread=True)
def object_sizes(
    state: State,
    filters: NamedDependency[Filters],
    bins: Annotated[
        int, QueryParameter(ge=1, le=MAX_BINS, description=f"about how many bins, 1..{MAX_BINS}")
    ] = DEFAULT_BINS,
    scale: Annotated[
        Literal["auto", "linear", "log"],
        QueryParameter(description="auto: log when the sizes span a tenfold range or more"),
    ] = "auto",
) -> SizeDistribution:
    """The ESD (µm) histogram per label on shared bin edges (``edges_um``), most
    objects first; no edges when no object matches."""
    pages: Pages = state.pages
    with pages.store() as store:
        return store.size_distribution(filters, bins=bins, scale=scale)


router = Router(
    path="/api/v1/objects",
    route_handlers=[object_summary, object_sizes],
    dependencies={"filters": Provide(provide_object_filters, sync_to_thread=False)},
)
