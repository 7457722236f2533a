"""Generated image files for the edge cases users have: every mode, EXIF rotation, bad files.

Small on purpose (tens of pixels): the CPU tests protect them with a tiny model in seconds.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms
from PIL.PngImagePlugin import PngInfo

ORIENTATION = 0x0112
MAKE = 0x010F
ARTIST = 0x013B
COPYRIGHT = 0x8298
WHITE_POINT = 0x013E  # a RATIONAL tag of the main IFD
GPS_IFD = 0x8825
GPS_LATITUDE = 2
CREATOR_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">'
    "<dc:creator><rdf:Seq><rdf:li>Ann Artist</rdf:li></rdf:Seq></dc:creator>"
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


def noise(height: int, width: int, channels: int = 3, *, seed: int = 0, dtype=np.uint8):
    """Smooth-ish random pixels: noise is the hardest case for lossless savers, not the engine."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, top, shape, dtype=dtype, endpoint=True)


def rotated_jpeg(path: Path, width: int = 40, height: int = 24, orientation: int = 6) -> Path:
    """A JPEG stored sideways with an EXIF orientation tag and a camera make, as phones write."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    exif[MAKE] = "TestCam"
    Image.fromarray(noise(height, width)).save(path, quality=95, exif=exif)
    return path


def cmyk_profile() -> bytes:
    """A small valid ICC v2 CMYK profile (lut8 A2B0 to Lab) with a warm paper white.

    No CMYK profile ships with the test machine, so the test writes one. The warm white makes
    a conversion through the profile visibly different from Pillow's naive CMYK -> RGB.
    """
    grid = []
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    rgb = np.array([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)])
                    lightness, a, b = _srgb_to_lab(rgb * 0.92 + 0.02)
                    grid += [round(lightness * 255 / 100), round(a + 128), round(b + 128 + 12)]
    clut = bytes(int(np.clip(v, 0, 255)) for v in grid)
    identity = bytes(range(256))
    matrix = b"".join(struct.pack(">i", v) for v in (65536, 0, 0, 0, 65536, 0, 0, 0, 65536))
    a2b0 = b"mft1" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + identity * 4 + clut + identity * 3
    text = b"mimicshield test CMYK\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    d50 = (0.9642, 1.0, 0.8249)
    wtpt = b"XYZ " + bytes(4) + b"".join(struct.pack(">i", round(v * 65536)) for v in d50)
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", a2b0)]

    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + bytes(4)
        + bytes([2, 0x10, 0, 0])
        + b"prtrCMYKLab "
        + bytes(12)
        + b"acsp"
        + bytes(24)
        + struct.pack(">I", 1)  # relative colorimetric
        + b"".join(struct.pack(">i", round(v * 65536)) for v in d50)
    )
    header += bytes(128 - len(header))
    return header + table + body


def _srgb_to_lab(rgb: np.ndarray) -> tuple[float, float, float]:
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array(
        [[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606], [0.0139, 0.0971, 0.7141]]
    )  # sRGB -> XYZ, adapted to D50
    xyz = to_xyz @ linear / np.array([0.9642, 1.0, 0.8249])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return 116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])


def srgb() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def private_exif(orientation: int = 1) -> Image.Exif:
    """EXIF as a phone writes it: camera, author, and where the photo was taken (GPS)."""
    exif = Image.Exif()
    exif[MAKE] = "TestCam"
    exif[ARTIST] = "Ann Artist"
    if orientation != 1:
        exif[ORIENTATION] = orientation
    exif.get_ifd(GPS_IFD).update({1: "N", GPS_LATITUDE: (48.0, 51.0, 29.0)})
    return exif


def private_jpeg(path: Path, width: int = 32, height: int = 24) -> Path:
    """A JPEG with an ICC profile, EXIF with GPS, an XMP creator and a comment."""
    Image.fromarray(noise(height, width, seed=12)).save(
        path,
        quality=95,
        icc_profile=srgb(),
        exif=private_exif(),
        xmp=CREATOR_XMP.encode(),
        comment="shot at home",
    )
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(
    path: Path,
    height: int = 24,
    width: int = 32,
    channels: int = 3,
    *,
    seed: int = 0,
    icc: bytes | None = None,
    exif: Image.Exif | None = None,
    text: dict[str, str] | None = None,
    xmp: str | None = None,
    colour_key: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """A 16-bit RGB(A) PNG ("48/64-bit"), which Pillow cannot write: OpenCV writes the pixels and
    the metadata chunks are added here, by hand. Returns the pixels as stored, RGB(A) order."""
    import cv2

    pixels = noise(height, width, channels, seed=seed, dtype=np.uint16)
    encoded = cv2.imencode(".png", pixels[..., [2, 1, 0, 3][:channels]])[1].tobytes()
    chunks = []
    if icc:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)))
    if colour_key:
        chunks.append(_png_chunk(b"tRNS", struct.pack(">3H", *colour_key)))
    for key, value in (text or {}).items():
        chunks.append(_png_chunk(b"tEXt", f"{key}\0{value}".encode("latin-1")))
    if xmp:
        chunks.append(_png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode()))
    if exif is not None:
        chunks.append(_png_chunk(b"eXIf", exif.tobytes().removeprefix(b"Exif\0\0")))
    header_end = 8 + 25  # the signature, then IHDR: OpenCV's own chunks follow
    path.write_bytes(encoded[:header_end] + b"".join(chunks) + encoded[header_end:])
    return pixels


def tiff16(path: Path, height: int = 24, width: int = 32, *, seed: int = 0) -> np.ndarray:
    """A 16-bit RGB TIFF stored sideways (orientation 6) with an ICC profile, an XMP creator and
    main-IFD EXIF tags: text, and a RATIONAL. Returns the pixels as stored."""
    import tifffile

    pixels = noise(height, width, 3, seed=seed, dtype=np.uint16)
    xmp = CREATOR_XMP.encode()
    tags = [
        (MAKE, "s", 0, "TestCam", True),
        (ARTIST, "s", 0, "Ann Artist", True),
        (COPYRIGHT, "s", 0, "(c) Ann Artist", True),
        (WHITE_POINT, 5, 2, (3127, 10000, 3290, 10000), True),
        (ORIENTATION, 3, 1, 6, True),
        (700, "B", len(xmp), xmp, True),
    ]
    tifffile.imwrite(path, pixels, photometric="rgb", iccprofile=srgb(), extratags=tags)
    return pixels


def cmyk_jpeg(path: Path, width: int = 32, height: int = 24) -> Path:
    image = Image.fromarray(noise(height, width, 4, seed=3), mode="CMYK")
    image.save(path, quality=95, icc_profile=cmyk_profile())
    return path


def edge_case_folder(folder: Path) -> dict[str, Path]:
    """One of every input users have, as small files: name -> path."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "rgb": folder / "odd_37x29.png",
        "rgba": folder / "sticker.png",
        "grey": folder / "scan.png",
        "grey_alpha": folder / "scan_alpha.png",
        "palette": folder / "palette.gif.png",
        "grey16": folder / "grey16.png",
        "rgb48": folder / "deep.tif",
        "rgb48_png": folder / "deep48.png",
        "rgba64_png": folder / "deep64.png",
        "rotated": folder / "phone.jpg",
        "cmyk": folder / "print.jpg",
    }
    text = PngInfo()
    text.add_text("Author", "Ann Artist")
    Image.fromarray(noise(29, 37, seed=1)).save(
        files["rgb"], dpi=(300, 300), icc_profile=srgb(), pnginfo=text
    )
    Image.fromarray(noise(24, 32, 4, seed=2)).save(files["rgba"])
    Image.fromarray(noise(24, 32, 1, seed=4)).save(files["grey"])
    Image.fromarray(noise(24, 32, 2, seed=5)).save(files["grey_alpha"])
    palette = Image.fromarray(noise(24, 32, seed=6)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(files["palette"], transparency=0)
    Image.fromarray(noise(24, 32, 1, seed=7, dtype=np.uint16)).save(files["grey16"])
    tifffile.imwrite(files["rgb48"], noise(24, 32, 3, seed=8, dtype=np.uint16), photometric="rgb")
    png16(files["rgb48_png"], channels=3, seed=13, icc=srgb())
    png16(files["rgba64_png"], channels=4, seed=14)
    rotated_jpeg(files["rotated"])
    cmyk_jpeg(files["cmyk"])
    return files


def bad_files(folder: Path) -> dict[str, Path]:
    """Files that must fail with one clear line each: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "zero": folder / "empty.png",
        "corrupt": folder / "corrupt.png",
        "truncated": folder / "truncated.png",
        "not_image": folder / "notes.jpg",
        "unsupported": folder / "float.tif",
    }
    files["zero"].write_bytes(b"")
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    Image.fromarray(noise(32, 32, seed=9)).save(files["truncated"])
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["not_image"].write_text("these are my notes, not a photo\n")
    Image.fromarray(np.zeros((8, 8), np.float32)).save(files["unsupported"])
    return files
