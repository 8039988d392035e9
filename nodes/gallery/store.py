"""Durable gallery storage: enrolled subjects, their templates exactly as received,
and the node's records, in one database (SQLite file by default, PostgreSQL at scale).

Enrollment and removal are single transactions: a failed stream stores nothing.

Several processes may serve one store: the shards of a sharded node (each reads its partition,
:mod:`nodes.gallery.partition`) and the replicas of each shard. They keep their in-memory
galleries in step through a change counter: every enrolment or removal takes the next *version*
(the writers queue on the one state row, so versions commit in order), stamps it on the subjects
it writes and on a *removal* row per subject it deletes, and a process catches up by reading what
carries a version above the last one it has seen (:mod:`nodes.gallery.replica`).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Generic

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fedprint.database import connect
from fedprint.migrations import Migrations, upgrade
from nodes.gallery.partition import WHOLE, Partition, subject_bucket
from nodes.gallery.records import RecordStore, RecordT


class _Base(DeclarativeBase):
    pass


class SubjectRow(_Base):
    __tablename__ = "gallery_subjects"
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    enrolled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    #: :func:`nodes.gallery.partition.subject_bucket` of the id: a shard reads its partition by it.
    bucket: Mapped[int] = mapped_column(Integer, server_default="0")
    #: The store version of the enrolment that wrote this subject.
    version: Mapped[int] = mapped_column(BigInteger, server_default="0", index=True)


class FingerRow(_Base):
    __tablename__ = "gallery_fingers"
    subject_id: Mapped[str] = mapped_column(
        ForeignKey("gallery_subjects.subject_id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    # biometrics.v1.TemplateFormat of `data`; the bytes are kept as received so the
    # gallery can be re-encoded when the matcher's internal format changes.
    format: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class RemovalRow(_Base):
    """A subject removed and not enrolled again since: the version of its removal, so that the
    processes holding it in memory learn to drop it. Enrolling the subject again deletes the row."""

    __tablename__ = "gallery_removals"
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(BigInteger, index=True)


class StateRow(_Base):
    """One row: the store's identity and its change counter."""

    __tablename__ = "gallery_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Made once with the store: a cache of another store never passes for one of this one.
    token: Mapped[str] = mapped_column(String(32))
    #: The last version written (0 before the first enrolment).
    version: Mapped[int] = mapped_column(BigInteger, server_default="0")


class CalibrationUpdateRow(_Base):
    """One change of the thresholds a node learned from its own gallery: the node's record of
    every move (what, when, on how much evidence), and the calibration it restarts with."""

    __tablename__ = "gallery_calibration_updates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    #: Digest of the configured (prior) calibration and learning policy it was learned under: a
    #: node configured otherwise starts again from its configuration.
    prior: Mapped[str] = mapped_column(String(32), index=True)
    gallery_size: Mapped[int] = mapped_column(Integer)
    subjects: Mapped[int] = mapped_column(Integer)
    pairs: Mapped[int] = mapped_column(Integer)
    duplicates: Mapped[int] = mapped_column(Integer)
    #: The thresholds adopted (calibration.thresholds.Thresholds as JSON) and, per finger count,
    #: how far the hit threshold moved at ``gallery_size`` (JSON list).
    thresholds: Mapped[str] = mapped_column(Text)
    moves: Mapped[str] = mapped_column(Text)


class ReturnedCandidateRow(_Base):
    """A subject the node returned to a caller as the deciding candidate of a probe, in the review
    or hit band: what lets that caller fetch the subject for an examiner's review (GetSubject),
    for a while (:mod:`nodes.gallery.releases`). Rows expire and are purged."""

    __tablename__ = "gallery_returned_candidates"
    #: The caller's certificate subject ("" on a plaintext node).
    caller: Mapped[str] = mapped_column(String(512), primary_key=True)
    probe_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: biometrics.v1.DecisionBand the candidate was returned in.
    band: Mapped[int] = mapped_column(Integer)
    returned_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class SubjectReleaseRow(_Base):
    """One release of a subject's prints and record (GetSubject): the node's audit of who got
    which subject, for which probe (the review) and examiner."""

    __tablename__ = "gallery_subject_releases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    released_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    caller: Mapped[str] = mapped_column(String(512))
    probe_id: Mapped[str] = mapped_column(String(64), index=True)
    subject_id: Mapped[str] = mapped_column(String(64))
    #: The examiner the caller named (not checked by the node).
    examiner: Mapped[str] = mapped_column(Text)


@dataclass(frozen=True)
class ReturnedCandidate:
    """A deciding candidate returned to ``caller`` for probe ``probe_id``."""

    caller: str
    probe_id: str
    subject_id: str
    band: int


@dataclass(frozen=True)
class SubjectRelease:
    """A stored :class:`SubjectReleaseRow`."""

    released_at: dt.datetime
    caller: str
    probe_id: str
    subject_id: str
    examiner: str


@dataclass(frozen=True)
class CalibrationUpdate:
    """A stored :class:`CalibrationUpdateRow`."""

    at: dt.datetime
    prior: str
    gallery_size: int
    subjects: int
    pairs: int
    duplicates: int
    thresholds: str
    moves: list[float]


def _aware(t: dt.datetime) -> dt.datetime:
    # SQLite returns naive datetimes; everything stored here is UTC.
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _rows(result: Any) -> int:
    """How many rows a DELETE changed (SQLAlchemy types ``Session.execute`` without it)."""
    return int(getattr(result, "rowcount", 0) or 0)


#: The gallery tables' schema history (``nodes/gallery/migrations``).
MIGRATIONS = Migrations(
    name="gallery",
    versions=Path(__file__).with_name("migrations"),
    metadata=_Base.metadata,
    baseline="0001",
    baseline_table="gallery_subjects",
)


@dataclass(frozen=True)
class Enrollment(Generic[RecordT]):
    """One subject to store: templates by finger position (encoded records) and the node's record."""

    subject_id: str
    templates: dict[int, tuple[int, bytes]]
    record: RecordT


@dataclass(frozen=True)
class StoreState:
    """Which store, and how far its changes go."""

    token: str
    version: int


@dataclass(frozen=True)
class StoredSubject:
    """An enrolled subject as read back: its stored templates and the version that wrote them."""

    subject_id: str
    version: int
    templates: dict[int, tuple[int, bytes]]


@dataclass(frozen=True)
class Removal:
    """A subject removed at ``version`` (and not enrolled again since)."""

    subject_id: str
    version: int


class GalleryStore(Generic[RecordT]):
    """Templates and records of one node."""

    def __init__(self, url: str, records: RecordStore[RecordT]) -> None:
        self.records = records
        self._engine = connect(url)
        upgrade(self._engine, [MIGRATIONS, records.migrations])
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        try:
            with self._sessions.begin() as session:
                if session.get(StateRow, 1) is None:
                    session.add(StateRow(id=1, token=uuid.uuid4().hex, version=0))
        except IntegrityError:
            pass  # another process created it first

    def enroll(self, enrollments: Sequence[Enrollment[RecordT]]) -> int:
        """Stores all of them in one transaction, replacing earlier enrollments of the same ids;
        returns the version it wrote."""
        now = dt.datetime.now(dt.UTC)
        with self._sessions.begin() as session:
            # The version first: the row lock (PostgreSQL) or write lock (SQLite) it takes holds
            # every other writer back until this transaction commits, so versions commit in order.
            version = self._next_version(session)
            ids = [e.subject_id for e in enrollments]
            self._delete(session, ids)
            session.execute(delete(RemovalRow).where(RemovalRow.subject_id.in_(ids)))
            session.flush()
            session.add_all(
                SubjectRow(
                    subject_id=e.subject_id,
                    enrolled_at=now,
                    bucket=subject_bucket(e.subject_id),
                    version=version,
                )
                for e in enrollments
            )
            session.flush()  # subjects before the fingers that reference them
            for e in enrollments:
                session.add_all(
                    FingerRow(subject_id=e.subject_id, position=p, format=f, data=d)
                    for p, (f, d) in e.templates.items()
                )
                self.records.put(session, e.record)
            return version

    def remove(self, subject_ids: Sequence[str]) -> tuple[int, int]:
        """Deletes these subjects; returns how many existed and the version of the removal (the
        current version when none existed: nothing changed)."""
        with self._sessions.begin() as session:
            present = list(
                session.scalars(
                    select(SubjectRow.subject_id).where(SubjectRow.subject_id.in_(list(subject_ids)))
                )
            )
            if not present:
                return 0, self._version(session)
            version = self._next_version(session)
            removed = self._delete(session, present)
            session.execute(delete(RemovalRow).where(RemovalRow.subject_id.in_(present)))
            session.add_all(
                RemovalRow(subject_id=s, bucket=subject_bucket(s), version=version) for s in present
            )
            return removed, version

    @staticmethod
    def _next_version(session: Session) -> int:
        # Written before it is read: concurrent writers queue on the row and never share a version.
        session.execute(update(StateRow).where(StateRow.id == 1).values(version=StateRow.version + 1))
        return int(session.scalar(select(StateRow.version).where(StateRow.id == 1)) or 0)

    @staticmethod
    def _version(session: Session) -> int:
        return int(session.scalar(select(StateRow.version).where(StateRow.id == 1)) or 0)

    def state(self) -> StoreState:
        """The store's token and its current version."""
        with self._sessions() as session:
            row = session.get(StateRow, 1)
            assert row is not None
            return StoreState(row.token, row.version)

    def _delete(self, session: Session, subject_ids: Sequence[str]) -> int:
        rows = list(session.scalars(select(SubjectRow).where(SubjectRow.subject_id.in_(list(subject_ids)))))
        for row in rows:
            for finger in session.scalars(select(FingerRow).where(FingerRow.subject_id == row.subject_id)):
                session.delete(finger)
            session.delete(row)
        self.records.delete(session, subject_ids)
        return len(rows)

    def count(self, partition: Partition = WHOLE) -> int:
        """Enrolled subjects (of ``partition``)."""
        with self._sessions() as session:
            query = select(func.count()).select_from(SubjectRow)
            if not partition.whole:
                query = query.where(SubjectRow.bucket % partition.count == partition.index)
            return int(session.scalar(query) or 0)

    def templates(self, partition: Partition = WHOLE, since: int = 0) -> Iterator[StoredSubject]:
        """The enrolled subjects of ``partition`` written after version ``since``, with their
        stored templates, in subject-id order."""
        query = (
            select(
                FingerRow.subject_id, SubjectRow.version, FingerRow.position, FingerRow.format, FingerRow.data
            )
            .join(SubjectRow, SubjectRow.subject_id == FingerRow.subject_id)
            .order_by(FingerRow.subject_id, FingerRow.position)
        )
        if since:
            query = query.where(SubjectRow.version > since)
        if not partition.whole:
            query = query.where(SubjectRow.bucket % partition.count == partition.index)
        with self._sessions() as session:
            current: tuple[str, int] | None = None
            fingers: dict[int, tuple[int, bytes]] = {}
            for subject_id, version, position, fmt, data in session.execute(query):
                if current is None or subject_id != current[0]:
                    if current is not None:
                        yield StoredSubject(current[0], current[1], fingers)
                    current, fingers = (subject_id, version), {}
                fingers[position] = (fmt, data)
            if current is not None:
                yield StoredSubject(current[0], current[1], fingers)

    def removals(self, partition: Partition = WHOLE, since: int = 0) -> list[Removal]:
        """Subjects of ``partition`` removed after version ``since`` (and not enrolled again)."""
        query = select(RemovalRow.subject_id, RemovalRow.version).where(RemovalRow.version > since)
        if not partition.whole:
            query = query.where(RemovalRow.bucket % partition.count == partition.index)
        with self._sessions() as session:
            return [Removal(s, v) for s, v in session.execute(query.order_by(RemovalRow.version))]

    def subject(self, subject_id: str) -> tuple[dict[int, tuple[int, bytes]], RecordT | None] | None:
        """One enrolled subject's stored templates (position -> (format, data)) and record, or
        None when the subject is not enrolled."""
        with self._sessions() as session:
            if session.get(SubjectRow, subject_id) is None:
                return None
            rows = session.execute(
                select(FingerRow.position, FingerRow.format, FingerRow.data)
                .where(FingerRow.subject_id == subject_id)
                .order_by(FingerRow.position)
            )
            templates = {position: (fmt, data) for position, fmt, data in rows}
            return templates, self.records.get(session, [subject_id]).get(subject_id)

    def get_records(self, subject_ids: Sequence[str]) -> dict[str, RecordT]:
        with self._sessions() as session:
            return self.records.get(session, subject_ids)

    # -- need to know: what was returned to whom, and what was released -------------------------

    def record_returned(self, returned: Sequence[ReturnedCandidate]) -> None:
        """Records (or renews) deciding candidates returned to their callers, now."""
        if not returned:
            return
        now = dt.datetime.now(dt.UTC)
        with self._sessions.begin() as session:
            for r in returned:
                key = (r.caller, r.probe_id, r.subject_id)
                row = session.get(ReturnedCandidateRow, key)
                if row is None:
                    session.add(
                        ReturnedCandidateRow(
                            caller=r.caller,
                            probe_id=r.probe_id,
                            subject_id=r.subject_id,
                            band=r.band,
                            returned_at=now,
                        )
                    )
                else:  # the same probe searched again (a retried booking): the window starts anew
                    row.band, row.returned_at = r.band, now

    def returned_since(self, caller: str, probe_id: str, subject_id: str, since: dt.datetime) -> bool:
        """Whether ``subject_id`` was returned to ``caller`` for ``probe_id`` after ``since``."""
        with self._sessions() as session:
            row = session.get(ReturnedCandidateRow, (caller, probe_id, subject_id))
            return row is not None and _aware(row.returned_at) > since

    def record_release(self, release: SubjectRelease) -> None:
        """Appends a release to the node's record of them."""
        with self._sessions.begin() as session:
            session.add(SubjectReleaseRow(**asdict(release)))

    def releases(self, probe_id: str | None = None) -> list[SubjectRelease]:
        """The recorded releases (of ``probe_id``), oldest first."""
        query = select(SubjectReleaseRow).order_by(SubjectReleaseRow.id)
        if probe_id is not None:
            query = query.where(SubjectReleaseRow.probe_id == probe_id)
        with self._sessions() as session:
            return [
                SubjectRelease(_aware(r.released_at), r.caller, r.probe_id, r.subject_id, r.examiner)
                for r in session.scalars(query)
            ]

    def purge_returned(self, before: dt.datetime, keep: int) -> int:
        """Deletes the returned candidates recorded before ``before``, and the oldest beyond the
        newest ``keep``; returns how many."""
        with self._sessions.begin() as session:
            deleted = _rows(
                session.execute(delete(ReturnedCandidateRow).where(ReturnedCandidateRow.returned_at < before))
            )
            cutoff = session.scalar(
                select(ReturnedCandidateRow.returned_at)
                .order_by(ReturnedCandidateRow.returned_at.desc())
                .offset(keep)
                .limit(1)
            )
            if cutoff is not None:
                deleted += _rows(
                    session.execute(
                        delete(ReturnedCandidateRow).where(ReturnedCandidateRow.returned_at <= cutoff)
                    )
                )
            return deleted

    def record_calibration(self, update: CalibrationUpdate) -> None:
        """Appends a learned calibration (see :class:`CalibrationUpdateRow`)."""
        with self._sessions.begin() as session:
            session.add(CalibrationUpdateRow(**{**asdict(update), "moves": json.dumps(update.moves)}))

    def calibration_updates(self, prior: str, limit: int = 100) -> list[CalibrationUpdate]:
        """The calibrations learned under ``prior``, newest first."""
        with self._sessions() as session:
            rows = session.scalars(
                select(CalibrationUpdateRow)
                .where(CalibrationUpdateRow.prior == prior)
                .order_by(CalibrationUpdateRow.id.desc())
                .limit(limit)
            )
            return [
                CalibrationUpdate(
                    **{f.name: getattr(r, f.name) for f in fields(CalibrationUpdate) if f.name != "moves"},
                    moves=[float(m) for m in json.loads(r.moves)],
                )
                for r in rows
            ]

    def close(self) -> None:
        self._engine.dispose()


__all__ = [
    "Enrollment",
    "GalleryStore",
    "Removal",
    "ReturnedCandidate",
    "StoreState",
    "StoredSubject",
    "SubjectRelease",
]
