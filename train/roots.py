"""Several data folders as one dataset: ``fieldscope train DATA [DATA ...]``.

The next model trains on the original set plus the images reviewed in the field
(``fieldscope collect export --format folders``), without copying either into the
other. Each folder is discovered on its own (:func:`fieldscope.train.data.discover`,
so each may be class folders or train/val/test of them), then merged by class folder
name: a class may appear in several folders, and every file keeps its own path, so
two folders' ``a.png`` never collide.

Layouts:

* all class folders: their images are pooled and split stratified over the union
  (the split's ratios hold per class over all folders together);
* some split into train/val/test: those keep their meaning (a given val/ or test/ is
  never diluted), and the images of class-folder folders join train/, so they are
  trained on and carved like train/ images (a val/ or test/ missing everywhere is
  carved from the pooled train/, stratified).

A class needs images somewhere, not in every folder: a folder of reviewed images of
one species is fine. The same folder given twice, or one inside another, is refused
(its images would count twice).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from fieldscope.train.data import discover
from fieldscope.train.errors import TrainError
from fieldscope.train.samples import SPLITS, DatasetIndex, Sample

__all__ = ["discover_roots"]

log = logging.getLogger(__name__)


def discover_roots(data_dirs: Sequence[Path] | Path, *, min_classes: int = 2) -> DatasetIndex:
    """The classes and images of one or several data folders, merged by class name.

    Raises:
        TrainError: no folder given; a folder that does not exist or holds no images
            (named); a folder given twice or inside another; fewer than ``min_classes``
            classes over all folders.
    """
    dirs = [Path(data_dirs)] if isinstance(data_dirs, str | Path) else [Path(d) for d in data_dirs]
    if not dirs:
        raise TrainError("no data folder given; give one or more folders of class folders")
    if len(dirs) == 1:
        return discover(dirs[0], min_classes=min_classes)
    found = [discover(d, min_classes=1) for d in dirs]
    roots = tuple(ix.root for ix in found)
    _check_distinct(dirs, roots)
    labels = tuple(sorted({c for ix in found for c in ix.labels}))
    where = " + ".join(str(r) for r in roots)
    if len(labels) < min_classes:
        raise TrainError(
            f"only one class found in {where}: {labels[0]!r}; a classifier needs at least "
            "two class folders over all data folders"
        )
    return DatasetIndex(roots[0], labels, _merged_parts(found, labels), roots)


def _check_distinct(given: Sequence[Path], roots: Sequence[Path]) -> None:
    for i, a in enumerate(roots):
        for j, b in enumerate(roots):
            if i == j:
                continue
            if a == b and i < j:
                raise TrainError(
                    f"data folder {given[j]} is given twice ({a}); give each folder once"
                )
            if a in b.parents:
                raise TrainError(
                    f"data folder {given[j]} is inside data folder {given[i]}; its images "
                    f"would count twice: give {given[i]} or the folders beside {given[j]}"
                )


def _merged_parts(
    found: Sequence[DatasetIndex], labels: Sequence[str]
) -> dict[str, tuple[Sample, ...]]:
    """The union of every folder's parts, class indices renumbered to ``labels``."""
    index = {c: i for i, c in enumerate(labels)}

    def renumbered(ix: DatasetIndex, part: str) -> list[Sample]:
        return [Sample(s.path, index[ix.labels[s.label]]) for s in ix.parts[part]]

    if not any(ix.presplit for ix in found):
        return {"all": tuple(sorted(s for ix in found for s in renumbered(ix, "all")))}
    flat = [str(ix.root) for ix in found if not ix.presplit]
    if flat:
        log.info(
            "%s hold class folders and other data folders are split into train/val/test: "
            "their images join train/",
            ", ".join(flat),
        )
    parts: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for ix in found:
        for name in ix.parts:
            parts["train" if name == "all" else name].extend(renumbered(ix, name))
    return {name: tuple(sorted(v)) for name, v in parts.items() if v or name == "train"}
