"""Housekeeping of the shared-memory spool: which files are still to be read, routing a
reader's "release" to the file's writer, and removing what nobody will read. Mixed into
``ControlPlane``."""

from __future__ import annotations

import os
from typing import Any

from .. import shm
from . import model as m


class SpoolKeeper:
    spool: str | None
    writers: dict[str, Any]
    jobs: dict[str, m.Job]
    closing: bool

    def _drop_inputs(self, job: m.Job) -> None:
        # A connected writer recycles its files when the worker releases them; files of a
        # writer that is gone are nobody's: remove them.
        for f in self._shm_inputs(job):
            if shm.writer_of(f.path) not in self.writers:
                shm.discard([f])

    @staticmethod
    def _shm_inputs(job: m.Job) -> list[shm.SpoolRef]:
        return [
            f for part in ("blobs", "fn_blobs") for f in shm.spool_refs(job.body.get(part) or ())
        ]

    def route_release(self, paths: list[str]) -> None:
        """A reader let go of spool files: tell their writer, or remove orphans."""
        by_writer: dict[str, list[str]] = {}
        for p in paths:
            by_writer.setdefault(shm.writer_of(p), []).append(p)
        for writer, ps in by_writer.items():
            conn = self.writers.get(writer)
            if conn is not None:
                conn.send({"op": "release", "paths": ps})
            else:
                shm.remove(ps)

    def writer_gone(self, writer: str) -> None:
        """A connection that wrote spool files closed. Files still to be read stay (a
        client may reconnect; a job may run later); the rest go."""
        self.writers.pop(writer, None)
        if not self.spool:
            return
        folder = os.path.join(self.spool, writer)
        needed = self._needed_files()
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for n in names:
            p = os.path.join(folder, n)
            if p not in needed:
                shm.remove([p])
        if not needed:
            try:
                os.rmdir(folder)
            except OSError:
                pass

    def _needed_files(self) -> set[str]:
        """Spool files still to be read: inputs of unfinished jobs, undelivered results."""
        needed = {
            f.path
            for j in self.jobs.values()
            if j.status not in m.TERMINAL
            for f in self._shm_inputs(j)
        }
        for j in self.jobs.values():
            if j.result is not None and not j.delivered:
                needed.update(f.path for f in shm.spool_refs(j.result.get("blobs") or ()))
        return needed

    def clean_spool(self) -> None:
        """Remove spool files no unfinished job refers to (at start and at shutdown), and
        the folders left empty."""
        if not self.spool or not os.path.isdir(self.spool):
            return
        needed = self._needed_files()
        for writer in os.listdir(self.spool):
            if writer in self.writers:
                continue
            folder = os.path.join(self.spool, writer)
            for n in os.listdir(folder) if os.path.isdir(folder) else ():
                p = os.path.join(folder, n)
                if p not in needed:
                    shm.remove([p])
            try:
                os.rmdir(folder)
            except OSError:
                pass
        if self.closing:
            try:
                os.rmdir(self.spool)
            except OSError:
                pass

    @staticmethod
    def _drop_results(job: m.Job) -> None:
        shm.discard((job.result or {}).get("blobs") or ())
