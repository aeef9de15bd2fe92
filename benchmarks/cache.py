"""The on-disk cache written by :mod:`benchmarks.prepare`: one folder per model plus a manifest.

``<cache>/<name>/manifest.json`` records the recipe version, what each file is for, and the SHA-256 of every
file, so a rerun can skip a model whose files are all present and unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


@dataclass(frozen=True)
class ModelCache:
    """Paths and manifest of one model's cache folder."""

    root: Path
    name: str

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def path(self, relative: str) -> Path:
        return self.dir / relative

    def manifest(self) -> dict:
        """The manifest, or an error saying to run prepare."""
        file = self.dir / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: run `python -m benchmarks.prepare --cache {self.root} "
                                    f"--only {self.name}` first")
        return json.loads(file.read_text())

    def is_complete(self, recipe: str) -> bool:
        """True when the manifest matches ``recipe`` and every file it lists is present with its recorded hash."""
        file = self.dir / MANIFEST
        if not file.is_file():
            return False
        manifest = json.loads(file.read_text())
        if manifest.get("recipe") != recipe:
            return False
        hashes = manifest.get("sha256", {})
        return bool(hashes) and all(
            (self.dir / rel).is_file() and sha256(self.dir / rel) == digest for rel, digest in hashes.items())

    def write_manifest(self, recipe: str, info: dict) -> dict:
        """Hash every file in the folder and write the manifest (``info`` holds roles, counts, checks)."""
        manifest = {"name": self.name, "recipe": recipe, **info,
                    "sha256": {p.relative_to(self.dir).as_posix(): sha256(p) for p in _files_under(self.dir)}}
        (self.dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return manifest

    def role_paths(self, section: str) -> dict[str, Path]:
        """Absolute paths of a manifest section, e.g. ``role_paths("models") == {"model": .../model.onnx}``."""
        return {role: self.dir / rel for role, rel in self.manifest()[section].items()}
