"""``/objects``: what segmenting stations counted and measured, per label and sample.

The counts table (objects per label, per frame, their ESD in µm), the frames and
objects of each sample (per station and device; the sample id the station's ``sample``
command started, if any), and the size distribution per label as an inline SVG drawn
on the server, so the page works offline like the others. Without any segmenting
station in the store the page says so, and how to get one, instead of empty tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State

from fieldscope.collect.store import Filters, ObjectGroup, SizeDistribution, Store
from fieldscope.collect.web import views
from fieldscope.collect.web.pages import Pages, markup

__all__ = ["objects_page"]

# The filters the page offers (status and score do not apply to objects).
FILTERS = ("station", "device", "label", "sample")
# Each filter's store column.
_COLUMNS = {"station": "station", "device": "device", "label": "label", "sample": "sample_id"}


def _chart(pages: Pages, sizes: SizeDistribution) -> str:
    series = tuple((s.label, tuple(s.counts)) for s in sizes.labels)
    return str(pages.size_chart(tuple(sizes.edges_um), series, log=sizes.scale == "log"))


def _summary(store: Store, filters: Filters) -> dict[str, Any]:
    """The page's numbers: the whole selection, its samples and its sizes."""
    whole = store.object_summary(filters)
    empty = ObjectGroup(
        key={}, frames=0, frames_without_objects=0, objects=0, objects_per_frame=None,
        rejected_by_size=0, touching_border=0, truncated=0, labels=[],
    )  # fmt: skip
    total = whole[0] if whole else empty
    return {
        "total": total,
        "samples": store.object_summary(filters, ["station", "device", "sample"]),
        "sizes": store.size_distribution(filters),
    }


def render_objects(pages: Pages, query: Mapping[str, str]) -> Response[bytes]:
    filters, errors = views.page_filters({k: v for k, v in query.items() if k != "status"})
    with pages.store() as store:
        has_objects = store.has_objects()
        options = {c: store.distinct(_COLUMNS[c]) for c in FILTERS}
        numbers = _summary(store, filters) if has_objects else {}
    chart = _chart(pages, numbers["sizes"]) if has_objects else ""
    return pages.render(
        "objects.html",
        page="objects",
        query=query,
        errors=errors,
        options=options,
        has_objects=has_objects,
        chart=markup(chart),
        **numbers,
    )


@get("/objects", include_in_schema=False, sync_to_thread=True)
def objects_page(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    return render_objects(state.pages, dict(request.query_params.items()))
