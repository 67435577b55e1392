"""Where the model comes from: a local directory, a Hugging Face id, or the built-in demo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ModelSourceError(ValueError):
    """A model reference that cannot be served."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "local", "hf", "gcs" or "demo"
    reference: str | None  # what the user gave (None for the demo model)


def classify_model(reference: str | None) -> ModelSource:
    """Decide, without touching the network, what kind of model reference this is."""
    if not reference:
        return ModelSource("demo", None)
    if reference.startswith("gs://"):
        return ModelSource("gcs", reference)
    if "://" in reference:
        raise ModelSourceError(f"{reference}: unknown scheme; give a local dir or a HF id")
    path = Path(reference).expanduser()
    if path.is_dir():
        return ModelSource("local", reference)
    if reference.startswith(("/", ".", "~")):
        raise ModelSourceError(f"{reference}: no such model directory")
    return ModelSource("hf", reference)


def local_model(source: ModelSource, download_dir: Path) -> str:
    """What vLLM's --model gets: the demo model is made (once) on the spot; a gs://
    model is its local mirror (filled by the download program before engines start)."""
    if source.kind == "gcs":
        from engine.gcs import mirror_dir

        return str(mirror_dir(download_dir, source.reference or ""))
    if source.kind == "demo":
        from engine.demo_model import ensure_demo_model

        return str(ensure_demo_model())
    if source.kind == "local":
        return str(Path(source.reference or "").expanduser().resolve())
    return source.reference or ""
