"""What a file that should be a model seems to be, from its first bytes.

People pass images, exports, LFS pointers and web pages where a checkpoint belongs; naming what
the file is tells them what went wrong, where "cannot load" would not.
"""

from __future__ import annotations

import contextlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sniffed:
    """What a file seems to be, from its first bytes."""

    kind: str  # torch, safetensors, blank, other (named in ``what``) or unknown (binary)
    what: str


# First bytes of the files people mistake for a checkpoint.
MAGIC = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip-compressed file (decompress it first)",
    b"\x93NUMPY": "a NumPy array (.npy)",
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (a Keras .h5 model?)",
    b"GGUF": "a GGUF model (llama.cpp's format)",
    b"\x7fELF": "an executable program",
}
# torch.save's legacy (non-zip) format starts with this number, pickled.
LEGACY_TORCH = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def sniff_file(path: Path) -> Sniffed:
    """What the file at ``path`` seems to be, from its first bytes (and a zip's list of names).

    Raises OSError when it cannot be read."""
    with path.open("rb") as f:
        head = f.read(512)
    if not head.strip(b"\0"):  # what a save or a copy that never finished leaves
        size = path.stat().st_size
        if not size:
            return Sniffed("blank", "an empty file: 0 bytes")
        if size <= len(head):
            return Sniffed("blank", f"{size:,} zero bytes, nothing else")
    for magic, what in MAGIC.items():
        if head.startswith(magic):
            return Sniffed("other", what)
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(path)
    if head.startswith(LEGACY_TORCH):
        return Sniffed("torch", "a torch file (legacy format)")
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's protocol opcode
        return Sniffed("other", "a Python pickle, not a file torch.save wrote")
    safetensors = _sniff_safetensors(path, head)
    if safetensors is not None:
        return safetensors
    text = _text(head)
    if text is not None:
        return Sniffed("other", _describe_text(text))
    return Sniffed("unknown", "binary data of no format minigpt knows")


def _sniff_zip(path: Path) -> Sniffed:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):  # a torch file cut short, most likely
        return Sniffed("torch", "a zip archive cut short")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return Sniffed("torch", "a torch file")
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return Sniffed("other", f"a zip archive of {shown or 'nothing'}, not a torch file")


def _sniff_safetensors(path: Path, head: bytes) -> Sniffed | None:
    """A safetensors file: an 8-byte header length, then that many bytes of JSON."""
    size = path.stat().st_size
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if not (2 <= length <= size - 8 and head[8:9] == b"{"):
        return None
    fmt = None
    if length <= 2**20:  # the metadata of our exports is small; a foreign header may not be
        with path.open("rb") as f:
            f.seek(8)
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                header = json.loads(f.read(length))
                fmt = (header.get("__metadata__") or {}).get("format")
    what = "a safetensors file (weights only, no training state)"
    if fmt == "minigpt-safetensors":
        what = "a minigpt safetensors export (weights only, no training state)"
    return Sniffed("safetensors", what)


def _text(head: bytes) -> str | None:
    """``head`` as text when it reads as UTF-8 without control characters (a cut at the end of
    the 512 bytes may split a character)."""
    for cut in range(4):
        with contextlib.suppress(UnicodeDecodeError):
            text = head[: len(head) - cut].decode("utf-8")
            break
    else:
        return None
    return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None


def _describe_text(text: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith("version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if stripped[:15].lower().startswith(("<!doctype html", "<html")):
        return "an HTML page (a download that saved a web page?)"
    kind = "JSON text" if stripped[:1] in "{[" else "a text file"
    first = stripped.splitlines()[0] if stripped else ""
    return f"{kind} (it starts {first[:40]!r})" if first else kind
