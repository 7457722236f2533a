"""Metadata carried from input to output: EXIF without orientation, the provenance XMP, IPTC-IIM.

Pure bytes-in, bytes-out functions (no file I/O), so they can be tested on their own.

Why an XMP packet: the IPTC / PLUS "Data Mining" property is the machine-readable way to say
"no AI/ML training" that crawlers and dataset filters are starting to honour; ``dc:description``
tells a human reading the metadata why the pixels were changed.

Why IPTC-IIM: photographers' tools (Photo Mechanic, Lightroom, news agencies' pipelines) still
write By-line, CopyrightNotice and Keywords there, and a protected copy must keep the credit.
It travels in three wrappings, all built and read here from the specs (IPTC-IIM 4.2, Adobe's
Photoshop File Formats "Image Resource Blocks", ITU T.81 markers): a JPEG APP13 "Photoshop 3.0"
segment holding an image resource 0x0404, a TIFF tag 33723, and ImageMagick's PNG text chunk
"Raw profile type iptc" (hex, the convention exiftool reads and writes).
"""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator

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


# --- IPTC-IIM --------------------------------------------------------------------------------

IPTC_TAG_MARKER = 0x1C  # every IIM dataset starts with it
IPTC_RESOURCE = 0x0404  # the Photoshop image resource holding IPTC-IIM
IRB_SIGNATURE = b"8BIM"
PHOTOSHOP_APP13 = b"Photoshop 3.0\x00"  # the APP13 identifier Photoshop writes and readers test
IPTC_RAW_PROFILE = "Raw profile type iptc"  # ImageMagick's PNG text chunk key
IRB_RAW_PROFILE = "Raw profile type 8bim"  # ImageMagick's chunk for the whole resource list
JPEG_SOI = b"\xff\xd8"
JPEG_MAX_SEGMENT_DATA = 65533  # a segment's 2-byte length counts itself: 65535 - 2
RAW_PROFILE = re.compile(r"\n([^\n]*)\n\s*(\d+)\n(.*)", re.DOTALL)
RAW_PROFILE_LINE_BYTES = 36  # ImageMagick's 72 hex digits a line


def iptc_datasets(iptc: bytes) -> list[tuple[int, int, bytes]]:
    """The (record, dataset, value) triples of IIM data; ValueError if it is not well formed.

    Each dataset is 0x1C, record, dataset number and a 2-byte big-endian length; a length with
    its top bit set is "extended": its low 15 bits count the bytes of the real length that follow.
    Zero bytes after the last dataset are padding some writers leave, and are allowed.
    """
    datasets, position = [], 0
    while position < len(iptc) and iptc[position:].strip(b"\x00"):
        if iptc[position] != IPTC_TAG_MARKER or position + 5 > len(iptc):
            raise ValueError(f"no IPTC dataset at byte {position}")
        record, number = iptc[position + 1], iptc[position + 2]
        (length,) = struct.unpack(">H", iptc[position + 3 : position + 5])
        position += 5
        if length & 0x8000:
            size = length & 0x7FFF
            if not 1 <= size <= 4 or position + size > len(iptc):
                raise ValueError(f"bad extended IPTC length at byte {position}")
            length = int.from_bytes(iptc[position : position + size], "big")
            position += size
        if position + length > len(iptc):
            raise ValueError(f"IPTC dataset {record}:{number} runs past the end")
        datasets.append((record, number, iptc[position : position + length]))
        position += length
    if not datasets:
        raise ValueError("no IPTC datasets")
    return datasets


def checked_iptc(iptc: bytes | None) -> bytes | None:
    """``iptc`` if it parses as IIM (None stays None); ValueError otherwise, so a damaged
    block is dropped at load time rather than copied into a file other tools then misread."""
    if iptc is None:
        return None
    iptc_datasets(iptc)
    return iptc


def irb_resources(irb: bytes) -> Iterator[tuple[int, bytes]]:
    """(id, data) for each Photoshop image resource: "8BIM", a 2-byte id, a Pascal-string name
    padded to an even length, a 4-byte size and the data, padded to an even length."""
    position = 0
    while position < len(irb):
        if irb[position : position + 4] != IRB_SIGNATURE or position + 8 > len(irb):
            raise ValueError(f"no image resource at byte {position}")
        (resource,) = struct.unpack(">H", irb[position + 4 : position + 6])
        name_length = irb[position + 6]
        position += 6 + name_length + 1 + (name_length + 1) % 2
        if position + 4 > len(irb):
            raise ValueError(f"image resource {resource:#06x} is truncated")
        (size,) = struct.unpack(">I", irb[position : position + 4])
        position += 4
        if position + size > len(irb):
            raise ValueError(f"image resource {resource:#06x} runs past the end")
        yield resource, irb[position : position + size]
        position += size + size % 2


def iptc_from_irb(irb: bytes) -> bytes | None:
    """The IIM data in a Photoshop resource list (None if it has none); ValueError if damaged."""
    found = [data for resource, data in irb_resources(irb) if resource == IPTC_RESOURCE]
    return checked_iptc(found[0]) if found else None


def iptc_from_app13(segments: list[bytes]) -> bytes | None:
    """The IIM data in a JPEG's APP13 segments (their data, as Pillow's ``applist`` holds it).

    Photoshop splits a resource list too long for one segment over several "Photoshop 3.0"
    segments, so their bodies are joined before parsing. Other APP13 segments are ignored.
    """
    bodies = [s[len(PHOTOSHOP_APP13) :] for s in segments if s.startswith(PHOTOSHOP_APP13)]
    return iptc_from_irb(b"".join(bodies)) if bodies else None


def iptc_from_raw_profile(text: str) -> bytes | None:
    """The IIM data in an ImageMagick raw profile text; ValueError if damaged.

    The text is "\\n<name>\\n<length>\\n<hex lines>". The bytes may be IIM itself or a
    Photoshop resource list holding it (exiftool writes the latter, older ImageMagick the former),
    told apart by their first byte as exiftool does.
    """
    match = RAW_PROFILE.match(text)
    if match is None:
        raise ValueError("not an ImageMagick raw profile")
    data = bytes.fromhex("".join(match.group(3).split()))
    if len(data) != int(match.group(2)):
        raise ValueError(f"raw profile holds {len(data)} bytes, its header says {match.group(2)}")
    if data.startswith(IRB_SIGNATURE):
        return iptc_from_irb(data)
    return checked_iptc(data)


def iptc_irb(iptc: bytes) -> bytes:
    """A Photoshop resource list with one resource, 0x0404 (empty name), holding ``iptc``."""
    padding = b"\x00" * (len(iptc) % 2)
    return IRB_SIGNATURE + struct.pack(">HHI", IPTC_RESOURCE, 0, len(iptc)) + iptc + padding


def iptc_raw_profile(iptc: bytes) -> str:
    """``iptc`` as ImageMagick's PNG raw profile text, wrapped in a resource list as exiftool
    writes it (exiftool and ImageMagick both read this form back as IPTC)."""
    data = iptc_irb(iptc)
    step = RAW_PROFILE_LINE_BYTES
    lines = [data[i : i + step].hex() for i in range(0, len(data), step)]
    return f"\niptc\n{len(data):8d}\n" + "\n".join(lines) + "\n"


def iptc_app13(iptc: bytes) -> bytes | None:
    """A whole JPEG APP13 segment (marker and length included) holding ``iptc``, or None if
    it would not fit in one segment (64 KB; the caller notes it rather than split it)."""
    body = PHOTOSHOP_APP13 + iptc_irb(iptc)
    if len(body) > JPEG_MAX_SEGMENT_DATA:
        return None
    return b"\xff\xed" + struct.pack(">H", len(body) + 2) + body


def insert_jpeg_segment(jpeg: bytes, segment: bytes) -> bytes:
    """``jpeg`` with ``segment`` after its leading APP0-APP2 segments (JFIF, EXIF, XMP, ICC).

    JFIF must come first and EXIF readers expect APP1 next; APP13 goes after them and before
    the quantisation tables, where Photoshop puts it. Every segment up to there has a 2-byte
    length after its marker (T.81 B.1.1.4), so they are stepped over by their lengths.
    """
    if not jpeg.startswith(JPEG_SOI):
        raise ValueError("not a JPEG stream")
    position = len(JPEG_SOI)
    while jpeg[position : position + 1] == b"\xff" and 0xE0 <= jpeg[position + 1] <= 0xE2:
        (length,) = struct.unpack(">H", jpeg[position + 2 : position + 4])
        position += 2 + length
    return jpeg[:position] + segment + jpeg[position:]
