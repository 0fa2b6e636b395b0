"""The dataset's metadata for a Darwin Core Archive: ``dataset.toml`` -> ``eml.xml``.

GBIF (and its IPT) will not publish an archive without EML: a title, a licence it
accepts (CC0, CC-BY or CC-BY-NC), who made the data and whom to ask. The collector's
operator writes them once in a TOML file given to ``collect export --metadata``::

    title = "Plankton of the Wadden Sea, fieldscope stations 2026"
    licence = "CC-BY"            # CC0, CC-BY or CC-BY-NC (or their URL)
    abstract = "Automated light-microscopy identifications ..."

    [creator]
    name = "Ada Lovelace"
    email = "ada@example.org"
    organisation = "Example Marine Institute"

    [contact]                    # the same keys; may be the creator again
    name = "Grace Hopper"
    email = "grace@example.org"
    organisation = "Example Marine Institute"

The EML written follows GBIF's metadata profile (EML 2.1.1).
"""

from __future__ import annotations

import tomllib
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fieldscope.collect.export.base import ExportError

__all__ = ["LICENCES", "DatasetMetadata", "Party", "eml_xml", "read_metadata"]

EML_NS = "eml://ecoinformatics.org/eml-2.1.1"
_XSI = "http://www.w3.org/2001/XMLSchema-instance"
_SCHEMA = "http://rs.gbif.org/schema/eml-gbif-profile/1.1/eml.xsd"
# The licences GBIF accepts, by the short names a dataset.toml uses: (URL, title).
LICENCES: dict[str, tuple[str, str]] = {
    "CC0": (
        "http://creativecommons.org/publicdomain/zero/1.0/legalcode",
        "Public Domain (CC0 1.0)",
    ),
    "CC-BY": (
        "http://creativecommons.org/licenses/by/4.0/legalcode",
        "Creative Commons Attribution (CC-BY) 4.0",
    ),
    "CC-BY-NC": (
        "http://creativecommons.org/licenses/by-nc/4.0/legalcode",
        "Creative Commons Attribution Non Commercial (CC-BY-NC) 4.0",
    ),
}
_PARTY_KEYS = ("name", "email", "organisation")
_REQUIRED = (
    "title",
    "licence",
    "abstract",
    *(f"{who}.{key}" for who in ("creator", "contact") for key in _PARTY_KEYS),
)


@dataclass(frozen=True)
class Party:
    """A person of the dataset (creator, contact) and their organisation."""

    name: str
    email: str
    organisation: str


@dataclass(frozen=True)
class DatasetMetadata:
    """What ``dataset.toml`` says; ``licence`` is one of :data:`LICENCES`' names."""

    title: str
    licence: str
    abstract: str
    creator: Party
    contact: Party


def _licence(value: str, where: str) -> str:
    given = value.strip()
    for name, (url, _) in LICENCES.items():
        if given.upper() == name or given.rstrip("/").removesuffix("/legalcode") in (
            url.removesuffix("/legalcode"),
            url.replace("http://", "https://").removesuffix("/legalcode"),
        ):
            return name
    raise ExportError(
        f"{where}: licence {value!r} is not one GBIF accepts; use {', '.join(LICENCES)}"
    )


def _value(table: dict[str, Any], dotted: str) -> str | None:
    node: Any = table
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node.strip() if isinstance(node, str) and node.strip() else None


def read_metadata(path: Path) -> DatasetMetadata:
    """Read ``dataset.toml``.

    Raises:
        ExportError: unreadable, not TOML, a bad licence, or missing keys (all named).
    """
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExportError(f"cannot read --metadata {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"--metadata {path} is not valid TOML: {exc}") from None
    if "license" in table and "licence" not in table:
        table["licence"] = table.pop("license")
    missing = [key for key in _REQUIRED if _value(table, key) is None]
    # XML 1.0 cannot hold control characters other than tab, newline and carriage return:
    # eml.xml would not parse (GBIF refuses the archive).
    unprintable = [
        key
        for key in _REQUIRED
        if any(ord(c) < 32 and c not in "\t\n\r" for c in str(_value(table, key) or ""))
    ]
    if unprintable:
        raise ExportError(
            f"--metadata {path}: key(s) {', '.join(unprintable)} hold control characters, "
            "which XML cannot carry; remove them"
        )
    if missing:
        raise ExportError(
            f"--metadata {path}: missing or empty key(s) {', '.join(missing)}; GBIF needs "
            "title, licence, abstract, and name, email and organisation of [creator] and [contact]"
        )

    def party(who: str) -> Party:
        return Party(*(str(_value(table, f"{who}.{key}")) for key in _PARTY_KEYS))

    return DatasetMetadata(
        title=str(_value(table, "title")),
        licence=_licence(str(_value(table, "licence")), f"--metadata {path}"),
        abstract=str(_value(table, "abstract")),
        creator=party("creator"),
        contact=party("contact"),
    )


def _party(parent: ET.Element, tag: str, who: Party) -> None:
    node = ET.SubElement(parent, tag)
    person = ET.SubElement(node, "individualName")
    given, _, surname = who.name.rpartition(" ")
    if given:
        ET.SubElement(person, "givenName").text = given
    ET.SubElement(person, "surName").text = surname
    ET.SubElement(node, "organizationName").text = who.organisation
    ET.SubElement(node, "electronicMailAddress").text = who.email


def eml_xml(meta: DatasetMetadata, package_id: str | None = None) -> bytes:
    """``eml.xml`` of the dataset (GBIF metadata profile, EML 2.1.1)."""
    ET.register_namespace("eml", EML_NS)
    root = ET.Element(
        f"{{{EML_NS}}}eml",
        {
            # The same dataset keeps its id from one export to the next.
            "packageId": package_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"eml:{meta.title}")),
            "system": "http://gbif.org",
            "scope": "system",
            "{http://www.w3.org/XML/1998/namespace}lang": "en",
            f"{{{_XSI}}}schemaLocation": f"{EML_NS} {_SCHEMA}",
        },
    )
    dataset = ET.SubElement(root, "dataset")
    ET.SubElement(dataset, "title").text = meta.title
    _party(dataset, "creator", meta.creator)
    _party(dataset, "metadataProvider", meta.contact)
    ET.SubElement(dataset, "pubDate").text = datetime.now(UTC).date().isoformat()
    ET.SubElement(dataset, "language").text = "en"
    ET.SubElement(ET.SubElement(dataset, "abstract"), "para").text = meta.abstract
    url, title = LICENCES[meta.licence]
    para = ET.SubElement(ET.SubElement(dataset, "intellectualRights"), "para")
    para.text = "This work is licensed under a "
    link = ET.SubElement(para, "ulink", {"url": url})
    ET.SubElement(link, "citetitle").text = title
    link.tail = "."
    _party(dataset, "contact", meta.contact)
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="UTF-8", xml_declaration=True)) + b"\n"
