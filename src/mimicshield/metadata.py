"""Metadata carried from input to output: EXIF without orientation, and the provenance XMP.

Pure bytes-in, bytes-out functions (no file I/O), so they can be tested on their own.

Why an XMP packet: the IPTC / PLUS "Data Mining" property is the machine-readable way to say
"no AI/ML training" that crawlers and dataset filters are starting to honour; ``dc:description``
tells a human reading the metadata why the pixels were changed.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from PIL import Image

DMI_PROHIBITED_AIML = "http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING"
PROVENANCE_NOTE = (
    "This image carries a small adversarial perturbation added by mimicshield to resist "
    "diffusion-based style mimicry. Use for AI/ML training is prohibited."
)

NAMESPACES = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "plus": "http://ns.useplus.org/ldf/xmp/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "xmpRights": "http://ns.adobe.com/xap/1.0/rights/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "Iptc4xmpCore": "http://iptc.org/std/Iptc4xmpCore/1.0/xmlns/",
}
for _prefix, _uri in NAMESPACES.items():
    ET.register_namespace(_prefix, _uri)

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
XPACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
XPACKET_END = '\n<?xpacket end="w"?>'

ORIENTATION = 0x0112
# TIFF tags that describe how pixels are stored (or where a thumbnail lives), not the photo.
# A TIFF's EXIF view includes them; copied into another file they would be false.
STRUCTURAL_TAGS = frozenset(
    {
        254, 255, 256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 280, 281, 284, 317, 320,
        322, 323, 324, 325, 338, 339, 340, 341, 513, 514, 530, 531, 532, 700, 33723, 34377,
        34675, 37724,
    }
)  # fmt: skip


def _q(prefix: str, name: str) -> str:
    return f"{{{NAMESPACES[prefix]}}}{name}"


def clean_exif(exif: Image.Exif) -> bytes | None:
    """EXIF bytes without the orientation (pixels are saved upright) and without the thumbnail.

    Pillow's ``Exif.tobytes`` writes IFD0 with its Exif and GPS sub-IFDs but never IFD1, which is
    where the thumbnail lives, so dropping the thumbnail needs only the structural tags removed.
    Returns None when nothing is left.
    """
    for tag in (ORIENTATION, *STRUCTURAL_TAGS):
        exif.pop(tag, None)
    if len(exif) == 0:
        return None
    return exif.tobytes()


def _as_text(xmp: bytes | str | None) -> str | None:
    if xmp is None:
        return None
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", errors="replace")
    xmp = xmp.strip("\x00 \r\n\t\ufeff")
    return xmp or None


def _parse(xmp: str | None) -> ET.Element | None:
    """The x:xmpmeta (or bare rdf:RDF) element of a packet, or None if absent or unreadable."""
    if xmp is None:
        return None
    start, end = xmp.find("<x:xmpmeta"), xmp.rfind("</x:xmpmeta>")
    if start >= 0 and end > start:
        xmp = xmp[start : end + len("</x:xmpmeta>")]
    elif (start := xmp.find("<rdf:RDF")) >= 0:
        xmp = xmp[start : xmp.rfind("</rdf:RDF>") + len("</rdf:RDF>")]
    try:
        return ET.fromstring(xmp)
    except ET.ParseError:
        return None


def _rdf(root: ET.Element) -> ET.Element:
    if root.tag == _q("rdf", "RDF"):
        return root
    rdf = root.find("rdf:RDF", NAMESPACES)
    if rdf is None:
        rdf = ET.SubElement(root, _q("rdf", "RDF"))
    return rdf


def _remove_property(description: ET.Element, prefix: str, name: str) -> None:
    description.attrib.pop(_q(prefix, name), None)
    for child in description.findall(f"{prefix}:{name}", NAMESPACES):
        description.remove(child)


def _append_note(description: ET.Element, note: str) -> bool:
    """Add ``note`` to an existing dc:description (every language); False if there is none."""
    items = description.findall("dc:description/rdf:Alt/rdf:li", NAMESPACES)
    for item in items:
        text = (item.text or "").strip()
        if note not in text:
            item.text = f"{text} {note}".strip()
    return bool(items)


def merge_xmp(existing: bytes | str | None, *, provenance: bool = True) -> bytes | None:
    """Merge the provenance properties into an image's XMP packet, keeping everything else.

    ``tiff:Orientation`` is dropped because the pixels are saved upright. An existing
    ``dc:description`` (the author's caption) is kept and the note appended to it. With
    ``provenance=False`` the packet is only cleaned of its orientation (None if there was none).
    An unreadable packet is replaced rather than copied half-understood.
    """
    text = _as_text(existing)
    root = _parse(text)
    if root is None and not provenance:
        return None
    if root is None:
        root = ET.Element(_q("x", "xmpmeta"))
    rdf = _rdf(root)
    has_description = False
    for description in rdf.findall("rdf:Description", NAMESPACES):
        _remove_property(description, "tiff", "Orientation")
        if provenance:
            _remove_property(description, "plus", "DataMining")
            has_description = _append_note(description, PROVENANCE_NOTE) or has_description

    if provenance:
        ours = ET.SubElement(rdf, _q("rdf", "Description"), {_q("rdf", "about"): ""})
        ET.SubElement(ours, _q("plus", "DataMining")).text = DMI_PROHIBITED_AIML
        if not has_description:
            alt = ET.SubElement(ET.SubElement(ours, _q("dc", "description")), _q("rdf", "Alt"))
            ET.SubElement(alt, _q("rdf", "li"), {XML_LANG: "x-default"}).text = PROVENANCE_NOTE
    body = ET.tostring(root, encoding="unicode")
    return (XPACKET_BEGIN + body + XPACKET_END).encode("utf-8")
