"""Real photos that ship inside scikit-image, with a short caption and a one-word subject each.

They exercise real JPEG/PNG decoding (colour and greyscale) in tests and the demo without any download.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path


@dataclass(frozen=True)
class SamplePhoto:
    name: str
    path: Path
    subject: str
    caption: str


_PHOTOS = [
    ("astronaut.png", "astronaut", "An astronaut in a white space suit holding a helmet, with a flag behind her."),
    ("chelsea.png", "cat", "A ginger tabby cat looking to the side."),
    ("coffee.png", "coffee", "A cup of coffee on a saucer, seen from above."),
    ("rocket.jpg", "rocket", "A rocket on its launch pad under a blue sky."),
    ("motorcycle_left.png", "motorcycle", "A red motorcycle parked in a room."),
    ("hubble_deep_field.jpg", "galaxies", "Many distant galaxies on a black sky."),
    ("camera.png", "cameraman", "A black and white photo of a man with a camera on a tripod."),
    ("page.png", "page", "A black and white scan of a page of printed text."),
]


def _skimage_data_dir() -> Path:
    spec = find_spec("skimage")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-image is not installed; it ships the sample photos")
    return Path(spec.origin).parent / "data"


def sample_photos() -> list[SamplePhoto]:
    """The photos (colour and greyscale, PNG and JPEG) found in scikit-image's data directory."""
    root = _skimage_data_dir()
    found = [SamplePhoto(name.rsplit(".", 1)[0], root / name, subject, caption) for name, subject, caption in _PHOTOS]
    missing = [p.path.name for p in found if not p.path.is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image data directory {root} lacks {missing}")
    return found
