"""The run cache: stage outputs kept content-addressed by fingerprint under `runs/.spar/cache/`.

`objects/<hh>/<hash>` holds each output's bytes once (by content hash); `stages/<fingerprint>.json`
lists the outputs a stage with that fingerprint produced and the params records that described
them. A stage whose fingerprint was produced before — by this experiment before an edit, or by
another experiment — is restored from here instead of being run. The manifest is written last,
so a crash mid-save leaves no entry that looks complete; every restored file is checked against
its hash.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from spar.store.files import (
    ParamsRecord,
    atomic_copy,
    atomic_write_text,
    now_iso,
    params_path,
    write_params,
)
from spar.store.hashing import hash_path


class CacheManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    stage_kind: str
    outputs: dict[str, str]  # output name -> content hash
    records: dict[str, ParamsRecord]  # output name -> the params record of the run that made it
    saved: str


@dataclass(frozen=True)
class CacheEntry:
    manifest: CacheManifest
    size: int


class RunCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.stages = root / "stages"

    def _object(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest

    def _manifest(self, fingerprint: str) -> Path:
        return self.stages / f"{fingerprint}.json"

    def save(
        self, fingerprint: str, outputs: dict[str, Path], records: dict[str, ParamsRecord]
    ) -> None:
        hashes: dict[str, str] = {}
        for name, path in outputs.items():
            digest = records[name].output_hash
            target = self._object(digest)
            if not target.exists():  # two stages saving equal bytes at once: both may copy
                atomic_copy(path, target)
            hashes[name] = digest
        manifest = CacheManifest(
            fingerprint=fingerprint,
            stage_kind=next(iter(records.values())).kind,
            outputs=hashes,
            records=records,
            saved=now_iso(),
        )
        # redacted: the records hold the resolved parameters, which may carry a secret
        atomic_write_text(self._manifest(fingerprint), manifest.model_dump_json(indent=1))

    def lookup(self, fingerprint: str) -> CacheManifest | None:
        path = self._manifest(fingerprint)
        if not path.exists():
            return None
        try:
            manifest = CacheManifest.model_validate_json(path.read_bytes())
        except ValueError:
            return None
        if not all(self._object(d).exists() for d in manifest.outputs.values()):
            return None
        return manifest

    def restore(
        self, manifest: CacheManifest, out_dir: Path, experiment: str, stage: str
    ) -> dict[str, ParamsRecord] | None:
        """Copy the outputs into `out_dir` with their params files; None if a cached object no
        longer matches its hash (it is dropped, and the stage runs instead)."""
        for digest in manifest.outputs.values():
            if hash_path(self._object(digest)) != digest:
                self._object(digest).unlink(missing_ok=True)
                return None
        out: dict[str, ParamsRecord] = {}
        for name, digest in manifest.outputs.items():
            target = out_dir / name
            old = manifest.records[name]
            rec = old.model_copy(
                update={
                    "experiment": experiment,
                    "stage": stage,
                    "restored_from": old.restored_from or old.experiment,
                }
            )
            params_path(target).unlink(missing_ok=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / f".{name}.restore.tmp"
            shutil.copyfile(self._object(digest), tmp)
            tmp.replace(target)
            write_params(target, rec)
            out[name] = rec
        return out

    # ----------------------------------------------------------------- garbage collection

    def entries(self) -> list[CacheEntry]:
        out: list[CacheEntry] = []
        if not self.stages.exists():
            return out
        for path in sorted(self.stages.glob("*.json")):
            try:
                manifest = CacheManifest.model_validate_json(path.read_bytes())
            except ValueError:
                continue
            size = sum(
                self._object(d).stat().st_size
                for d in manifest.outputs.values()
                if self._object(d).exists()
            )
            out.append(CacheEntry(manifest, size))
        return out

    def forget(self, fingerprints: set[str]) -> None:
        """Drop the manifests of `fingerprints`, then every object no manifest references."""
        for fp in fingerprints:
            self._manifest(fp).unlink(missing_ok=True)
        keep = {d for e in self.entries() for d in e.manifest.outputs.values()}
        if self.objects.exists():
            for obj in self.objects.glob("*/*"):
                if obj.name not in keep:
                    obj.unlink()
            for sub in self.objects.iterdir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
