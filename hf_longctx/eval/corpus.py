"""A real-text corpus from the Python sources installed on this machine.

No data set can be downloaded where the reference models are trained, but every machine with Python holds
hundreds of megabytes of real, long, human-written text: the standard library and site-packages (code,
comments, docstrings). Each top-level package (or single-module file) becomes one document: its ``.py``
files in sorted path order, each preceded by a header line ``# file: json/decoder.py``.

The train/validation split is decided by a stable hash of the document's name (``"json"``, ``"email"``),
so it is the same on every machine and in every process, and no validation document is ever trained on.
Which documents exist depends on what is installed; the split of a given name never does.
"""

import hashlib
import os
import site
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05
MAX_FILE_BYTES = 1_000_000
"""Files larger than this (bytes on disk) are skipped: they are generated tables, not prose or code."""
MAX_DOCUMENT_CHARS = 8_000_000
"""A package's document stops before the first file that would take it past this many characters."""
_EXCLUDED_NAMES = frozenset({"hf_longctx", "__pycache__"})
CHUNK_CHARS = 65_536
"""`line_chunks`' default piece size, in characters."""


@dataclass(frozen=True)
class Document:
    """One package's sources joined into one text.

    Attributes:
        name: the package's top-level import name, e.g. ``"json"``.
        text: its ``.py`` files, each as ``"# file: <path relative to the root>\\n" + source``.
        split: ``"train"`` or ``"validation"``, always equal to ``split_of(name)``.
    """

    name: str
    text: str
    split: str


def split_of(name: str) -> str:
    """The split of the document called `name`: ``"validation"`` for about 5% of names, else ``"train"``.

    Uses SHA-256 of the UTF-8 name, so the answer is the same on every machine and Python process.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if unit < VALIDATION_FRACTION else "train"


def default_roots() -> list[str]:
    """The directories that hold this interpreter's standard library and site-packages, deduplicated.

    Order: the standard library first, then the site-packages directories; only existing directories.
    """
    paths = sysconfig.get_paths()
    candidates = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    roots, seen = [], set()
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            roots.append(path)
    return roots


def _find_sources(roots: list[str]) -> dict[str, str]:
    """Map each top-level name to its package directory or module file; the first root that has it wins.

    Entries whose name is not an identifier (``site-packages``, ``foo-1.0.dist-info``) are not packages.
    """
    sources: dict[str, str] = {}
    for root in roots:
        try:
            entries = sorted(os.scandir(root), key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".py") and entry.is_file():
                name = entry.name[: -len(".py")]
            elif entry.is_dir():
                name = entry.name
            else:
                continue
            if name.isidentifier() and name not in _EXCLUDED_NAMES and name not in sources:
                sources[name] = entry.path
    return sources


def _python_files(path: str) -> list[tuple[str, str]]:
    """``(relative path with '/', absolute path)`` of every ``.py`` file under `path`, sorted."""
    base = os.path.dirname(path)
    if os.path.isfile(path):
        return [(os.path.basename(path), path)]
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [d for d in subfolders if d != "__pycache__" and not d.startswith(".")]
        for name in names:
            if name.endswith(".py"):
                full = os.path.join(folder, name)
                files.append((os.path.relpath(full, base).replace(os.sep, "/"), full))
    return sorted(files)


def _read_document(path: str) -> str:
    """Join the readable ``.py`` files under `path` (each <= 1 MB, valid UTF-8) up to 8 M characters."""
    pieces, total = [], 0
    for relative, full in _python_files(path):
        try:
            if os.path.getsize(full) > MAX_FILE_BYTES:
                continue
            with open(full, encoding="utf-8") as handle:
                source = handle.read()
        except (OSError, UnicodeDecodeError):
            continue
        piece = f"# file: {relative}\n{source}" + ("" if source.endswith("\n") else "\n")
        if total + len(piece) > MAX_DOCUMENT_CHARS:
            break
        pieces.append(piece)
        total += len(piece)
    return "".join(pieces)


def iter_documents(
    split: str = "train",
    roots: list[str] | None = None,
    max_documents: int | None = None,
    max_bytes: int | None = None,
    min_chars: int = 0,
) -> Iterator[Document]:
    """Yield the documents of one split, sorted by name; deterministic for a given set of files.

    Args:
        split: ``"train"`` or ``"validation"``.
        roots: directories whose top-level packages and modules become documents; `default_roots()` if
            None. A name found in several roots is taken from the first.
        max_documents: stop after this many documents (None: no limit).
        max_bytes: stop once the yielded texts total this many UTF-8 bytes; the last document is cut
            to fit exactly (None: no limit).
        min_chars: skip documents shorter than this many characters (empty documents are always skipped).

    Only the documents of the requested split are read from disk.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for label, value in (("max_documents", max_documents), ("max_bytes", max_bytes)):
        if value is not None and value < 0:
            raise ValueError(f"{label} must be None or an integer >= 0, got {value!r}")
    sources = _find_sources(default_roots() if roots is None else list(roots))
    count, used_bytes = 0, 0
    for name in sorted(sources):
        if split_of(name) != split:
            continue
        if (max_documents is not None and count >= max_documents) or (
            max_bytes is not None and used_bytes >= max_bytes
        ):
            return
        text = _read_document(sources[name])
        if not text or len(text) < min_chars:
            continue
        if max_bytes is not None:
            data = text.encode("utf-8")[: max_bytes - used_bytes]
            text = data.decode("utf-8", errors="ignore")
            used_bytes += len(data)
        count += 1
        yield Document(name=name, text=text, split=split)


def line_chunks(texts: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut each text into consecutive pieces of about `chunk_chars` characters that end at a newline where
    one exists; the pieces of one text concatenate back to it exactly.

    Tokenizing pieces rather than whole documents lets the `tokenizers` backend spread a few long
    documents over all cores (it parallelises across the sequences of a batch).
    """
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + chunk_chars)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end
