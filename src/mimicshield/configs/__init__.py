"""Built-in configs of each family, so a single checkpoint file loads offline; its CLIP tokenizer.

A ``.safetensors``/``.ckpt`` file holds weights only: diffusers' ``from_single_file`` also needs the
family's architecture, VAE scale and scheduler, which it otherwise fetches from the hub. The JSON
files in the folders beside this module are those configs (``sd1``, ``sd2-base``, ``sd2-v``,
``sdxl``), written for mimicshield from the published architectures (widths, depths, heads, VAE
scale, noise schedule) and checked by building each network from them and comparing its weights'
names and shapes with what diffusers' single-file converter produces
(``tests/test_offline_configs.py``).

They hold no vocabulary. The CLIP BPE tokenizer (``vocab.json`` and ``merges.txt``, 49,408 tokens,
the same for SD 1.x's CLIP ViT-L, SD 2.x's OpenCLIP ViT-H and both of SDXL's encoders) is not
written from facts but learned from data, so it is not shipped here. :func:`find_vocabulary` looks
for it where a user may already have it: the hub cache (any Stable Diffusion or CLIP repo's
tokenizer), then the BPE merges file the ``open_clip`` (or OpenAI ``clip``) package bundles, from
which the same vocabulary is built. Each family's ``tokenizer*/tokenizer_config.json`` holds only
what differs between families: SD 2.x and SDXL's second encoder pad with ``!``, as OpenCLIP does.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# the folder of the built-in configs (one subfolder per family); tests point it at tiny ones
CONFIGS = Path(__file__).parent
# packages that bundle OpenAI's CLIP BPE merges file, looked for (never imported) in this order
BPE_PACKAGES = ("open_clip", "clip")
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# repos whose tokenizer is the CLIP one, at the repo's root; looked up in the hub cache only
CLIP_TOKENIZER_REPOS = (
    "openai/clip-vit-large-patch14",
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14-336",
)
# Stable Diffusion repos besides the families' reference ones that carry the same tokenizer
OTHER_SD_REPOS = (
    "CompVis/stable-diffusion-v1-4",
    "stabilityai/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-xl-refiner-1.0",
)
TOKENIZER_FILES = ("vocab.json", "merges.txt")
START, END = "<|startoftext|>", "<|endoftext|>"
# byte-level BPE writes each of the 256 bytes as one character, and each also ends a word
_BYTE_TOKENS = 2 * 256
MERGES_HEADER = "#version: 0.2"


@dataclass(frozen=True)
class Vocabulary:
    """The two files of a CLIP tokenizer, and where they came from (for messages).

    Attributes:
        vocab_json: ``vocab.json``, token -> id.
        merges_txt: ``merges.txt``, the BPE merges in order, after a ``#version`` line.
        origin: e.g. "the hub cache (openai/clip-vit-large-patch14)".
    """

    vocab_json: bytes
    merges_txt: bytes
    origin: str

    def problem(self, size: int) -> str | None:
        """Why this is not the vocabulary of a text encoder of ``size`` tokens; None if it is.

        The text encoder's token embedding has one row per id, so any other size (another
        tokenizer's files) would look tokens up in the wrong rows, or out of range.
        """
        try:
            vocab = json.loads(self.vocab_json)
        except ValueError as error:
            return f"its vocab.json is not JSON ({error})"
        if not isinstance(vocab, dict) or START not in vocab or END not in vocab:
            return f"its vocab.json lacks CLIP's {START} and {END} tokens"
        ids = set(vocab.values())
        if len(vocab) != size or ids != set(range(size)):
            return f"its vocab.json has {len(vocab)} tokens, and the text encoder takes {size}"
        return None

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_bytes(self.vocab_json)
        (folder / "merges.txt").write_bytes(self.merges_txt)


def builtin_families() -> tuple[str, ...]:
    """The families that have built-in configs (a folder with a ``model_index.json``)."""
    return tuple(sorted(p.parent.name for p in CONFIGS.glob("*/model_index.json")))


def builtin_folder(family: str) -> Path:
    """The built-in configs of ``family``; a KeyError for a family without them."""
    folder = CONFIGS / family
    if not (folder / "model_index.json").is_file():
        raise KeyError(f"no built-in configs for the {family!r} family")
    return folder


def builtin_config(family: str, component: str) -> dict:
    """The built-in config of one component (``unet``, ``vae``, ``text_encoder``, ``scheduler``),
    without diffusers' bookkeeping keys (``_class_name``): what the network's class is built from.
    """
    folder = builtin_folder(family) / component
    name = "scheduler_config.json" if component.startswith("scheduler") else "config.json"
    config = json.loads((folder / name).read_text(encoding="utf-8"))
    return {key: value for key, value in config.items() if not key.startswith("_")}


def text_vocab_size(family: str) -> int:
    """The number of tokens the family's (first) text encoder embeds, from its config."""
    config = json.loads(
        (builtin_folder(family) / "text_encoder" / "config.json").read_text(encoding="utf-8")
    )
    return int(config["vocab_size"])


def vocabulary_in_folder(folder: Path) -> Vocabulary | None:
    """The tokenizer files in ``folder/tokenizer/``, or in ``folder`` itself; None if absent."""
    for place in (folder / "tokenizer", folder):
        files = [place / name for name in TOKENIZER_FILES]
        if all(file.is_file() for file in files):
            return Vocabulary(files[0].read_bytes(), files[1].read_bytes(), str(place))
    return None


def cached_vocabulary(repos: Iterable[str], size: int) -> Vocabulary | None:
    """The first usable CLIP tokenizer of ``repos`` already in the hub cache (never fetched).

    A diffusers repo keeps it in ``tokenizer/`` (SDXL also in ``tokenizer_2/``), a CLIP model's
    repo at its root.
    """
    from huggingface_hub import try_to_load_from_cache

    for repo in dict.fromkeys(repos):
        for subfolder in ("tokenizer/", "tokenizer_2/", ""):
            paths = [try_to_load_from_cache(repo, subfolder + name) for name in TOKENIZER_FILES]
            if not all(isinstance(path, str) for path in paths):
                continue
            vocab, merges = (Path(path).read_bytes() for path in paths)
            where = repo + "/" + subfolder.rstrip("/") if subfolder else repo
            found = Vocabulary(vocab, merges, f"the hub cache ({where})")
            if found.problem(size) is None:
                return found
    return None


def packaged_vocabulary(size: int) -> Vocabulary | None:
    """The CLIP vocabulary built from the BPE merges file an installed ``open_clip`` bundles.

    The package is found, not imported (that would load torchvision and timm). OpenAI's file
    lists the merges of a larger vocabulary; CLIP uses the first ``size - 514`` of them, after
    the 256 byte characters, the same 256 ending a word, and before the start and end tokens:
    the same ids as the ``vocab.json`` of the hub's CLIP tokenizers.
    """
    for package in BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            path = Path(location) / BPE_FILE
            if path.is_file():
                found = vocabulary_from_bpe(path, size, f"the {package} package ({path.name})")
                if found is not None and found.problem(size) is None:
                    return found
    return None


def vocabulary_from_bpe(path: Path, size: int, origin: str) -> Vocabulary | None:
    """``vocab.json`` and ``merges.txt`` of a ``size``-token CLIP tokenizer, from a BPE file.

    None when the file is unreadable or has too few merges for ``size``.
    """
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError):
        return None
    count = size - _BYTE_TOKENS - 2
    merges = [line for line in lines[1 : 1 + count] if line]
    if count < 0 or len(merges) != count or not all(len(m.split()) == 2 for m in merges):
        return None
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += [START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != size:  # a merge that repeats a token: not a CLIP file
        return None
    merges_txt = "\n".join([MERGES_HEADER, *merges]) + "\n"
    vocab_json = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
    return Vocabulary(vocab_json, merges_txt.encode("utf-8"), origin)


def byte_symbols() -> list[str]:
    """The characters byte-level BPE writes the 256 bytes as, in vocabulary order.

    Bytes that print as themselves (``!`` to ``~``, ``¡`` to ``¬``, ``®`` to ``ÿ``) come first,
    as their own characters; the other 68 (controls, space, no-break space, soft hyphen)
    follow in byte order, as the characters from U+0100 on, so that no token holds a space.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + n) for n in range(len(others))]


def find_vocabulary(repos: Iterable[str], size: int) -> Vocabulary | None:
    """A CLIP vocabulary of ``size`` tokens: from the hub cache (``repos`` first, then any CLIP
    repo), else from an installed ``open_clip``; None when neither has one."""
    candidates = [*repos, *OTHER_SD_REPOS, *CLIP_TOKENIZER_REPOS]
    return cached_vocabulary(candidates, size) or packaged_vocabulary(size)


@contextmanager
def assembled_configs(
    family: str, vocabulary: Vocabulary, *, in_channels: int | None = None
) -> Iterator[str]:
    """A temporary diffusers config folder: the family's built-in configs and the tokenizer.

    ``from_single_file`` reads a folder like the one a ``--model-config`` gives, so the built-in
    configs take the same path. ``in_channels`` overrides the UNet's (9 for an inpainting file:
    its family's inpainting model is the same network with the mask and masked image as inputs).
    """
    # the tokenizers read their files into memory; a file still open (Windows) is left behind
    with tempfile.TemporaryDirectory(
        prefix="mimicshield-configs-", ignore_cleanup_errors=True
    ) as temporary:
        folder = Path(temporary) / family
        shutil.copytree(builtin_folder(family), folder)
        if in_channels is not None:
            unet = folder / "unet" / "config.json"
            config = {**json.loads(unet.read_text(encoding="utf-8")), "in_channels": in_channels}
            unet.write_text(json.dumps(config, indent=2))
        for tokenizer in sorted(folder.glob("tokenizer*")):
            vocabulary.write(tokenizer)
        yield str(folder)
