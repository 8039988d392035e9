"""Durable gallery storage: enrolled subjects, their templates exactly as received,
and the node's records, in one database (SQLite file by default, PostgreSQL at scale).

Enrollment and removal are single transactions: a failed stream stores nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic

from sqlalchemy import DateTime, ForeignKey, Integer, LargeBinary, String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fedprint.database import connect
from nodes.gallery.records import RecordStore, RecordT


class _Base(DeclarativeBase):
    pass


class SubjectRow(_Base):
    __tablename__ = "gallery_subjects"
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    enrolled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


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


class StateRow(_Base):
    """One row: a token that changes with every enrolment or removal, so a cache of the encoded
    gallery can tell whether it still describes the stored one."""

    __tablename__ = "gallery_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(32))


@dataclass(frozen=True)
class Enrollment(Generic[RecordT]):
    """One subject to store: templates by finger position (encoded records) and the node's record."""

    subject_id: str
    templates: dict[int, tuple[int, bytes]]
    record: RecordT


class GalleryStore(Generic[RecordT]):
    """Templates and records of one node."""

    def __init__(self, url: str, records: RecordStore[RecordT]) -> None:
        self.records = records
        self._engine = connect(url)
        _Base.metadata.create_all(self._engine)
        records.metadata.create_all(self._engine)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)

    def enroll(self, enrollments: Sequence[Enrollment[RecordT]]) -> None:
        """Stores all of them in one transaction, replacing earlier enrollments of the same ids."""
        now = dt.datetime.now(dt.UTC)
        with self._sessions.begin() as session:
            ids = [e.subject_id for e in enrollments]
            self._delete(session, ids)
            session.flush()
            session.add_all(SubjectRow(subject_id=e.subject_id, enrolled_at=now) for e in enrollments)
            session.flush()  # subjects before the fingers that reference them
            for e in enrollments:
                session.add_all(
                    FingerRow(subject_id=e.subject_id, position=p, format=f, data=d)
                    for p, (f, d) in e.templates.items()
                )
                self.records.put(session, e.record)
            self._touch(session)

    def remove(self, subject_ids: Sequence[str]) -> int:
        """Deletes these subjects; returns how many existed."""
        with self._sessions.begin() as session:
            removed = self._delete(session, subject_ids)
            if removed:
                self._touch(session)
            return removed

    @staticmethod
    def _touch(session: Session) -> None:
        """Gives the stored gallery a new token, inside the transaction that changes it."""
        state = session.get(StateRow, 1)
        if state is None:
            session.add(StateRow(id=1, token=uuid.uuid4().hex))
        else:
            state.token = uuid.uuid4().hex

    def token(self) -> str:
        """The current state token of the stored gallery (see :class:`StateRow`)."""
        with self._sessions.begin() as session:
            state = session.get(StateRow, 1)
            if state is None:
                self._touch(session)
                state = session.get(StateRow, 1)
            assert state is not None
            return state.token

    def _delete(self, session: Session, subject_ids: Sequence[str]) -> int:
        rows = list(session.scalars(select(SubjectRow).where(SubjectRow.subject_id.in_(list(subject_ids)))))
        for row in rows:
            for finger in session.scalars(select(FingerRow).where(FingerRow.subject_id == row.subject_id)):
                session.delete(finger)
            session.delete(row)
        self.records.delete(session, subject_ids)
        return len(rows)

    def count(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(SubjectRow)) or 0)

    def templates(self) -> Iterator[tuple[str, dict[int, tuple[int, bytes]]]]:
        """Every enrolled subject with its stored templates, in subject-id order."""
        with self._sessions() as session:
            current: str | None = None
            fingers: dict[int, tuple[int, bytes]] = {}
            rows = session.execute(
                select(FingerRow.subject_id, FingerRow.position, FingerRow.format, FingerRow.data).order_by(
                    FingerRow.subject_id, FingerRow.position
                )
            )
            for subject_id, position, fmt, data in rows:
                if subject_id != current:
                    if current is not None:
                        yield current, fingers
                    current, fingers = subject_id, {}
                fingers[position] = (fmt, data)
            if current is not None:
                yield current, fingers

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

    def close(self) -> None:
        self._engine.dispose()


__all__ = ["Enrollment", "GalleryStore"]
