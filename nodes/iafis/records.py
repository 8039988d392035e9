"""IAFIS record model: subjects, their arrests, and the charges of each arrest with its disposition."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import DateTime, ForeignKey, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from fedprint.migrations import Migrations
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import FieldViolation
from fedprint.validation import (
    ORI,
    Violations,
    check_charges,
    check_count,
    check_descriptors,
    check_timestamp,
)
from nodes.gallery.records import DescriptorColumns, check_subject_id


class _Base(DeclarativeBase):
    pass


class CriminalSubject(DescriptorColumns, _Base):
    __tablename__ = "iafis_subjects"
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    arrests: Mapped[list[ArrestRow]] = relationship(
        back_populates="subject", cascade="all, delete-orphan", order_by="ArrestRow.arrested_at"
    )


class ArrestRow(_Base):
    __tablename__ = "iafis_arrests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_id: Mapped[str] = mapped_column(
        ForeignKey("iafis_subjects.subject_id", ondelete="CASCADE"), index=True
    )
    arrested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    ori: Mapped[str] = mapped_column(String(9))
    disposition: Mapped[int] = mapped_column(Integer)
    subject: Mapped[CriminalSubject] = relationship(back_populates="arrests")
    charges: Mapped[list[ChargeRow]] = relationship(
        back_populates="arrest", cascade="all, delete-orphan", order_by="ChargeRow.id"
    )


class ChargeRow(_Base):
    __tablename__ = "iafis_charges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    arrest_id: Mapped[int] = mapped_column(ForeignKey("iafis_arrests.id", ondelete="CASCADE"), index=True)
    ncic_code: Mapped[str] = mapped_column(String(4))
    literal: Mapped[str] = mapped_column(String(200))
    counts: Mapped[int] = mapped_column(Integer)
    arrest: Mapped[ArrestRow] = relationship(back_populates="charges")


#: Arrest cycles in one criminal history.
MAX_ARRESTS = 500
_DISPOSITIONS = frozenset(rec.Disposition.values())


class CriminalHistoryStore:
    """:class:`nodes.gallery.records.RecordStore` for ``fedprint.records.v1.CriminalHistory``."""

    record_field = "criminal_history"
    migrations = Migrations(
        name="iafis",
        versions=Path(__file__).with_name("migrations"),
        metadata=_Base.metadata,
        baseline="0001",
        baseline_table="iafis_subjects",
    )

    def validate(self, record: rec.CriminalHistory, subject_id: str, field: str) -> list[FieldViolation]:
        violations = Violations()
        violations.extend(check_subject_id(record.subject_id, subject_id, field))
        check_descriptors(record.descriptors, f"{field}.descriptors", violations)
        if check_count(len(record.arrests), MAX_ARRESTS, f"{field}.arrests", violations, "arrests"):
            for i, arrest in enumerate(record.arrests):
                where = f"{field}.arrests[{i}]"
                check_timestamp(arrest.arrested_at, f"{where}.arrested_at", violations)
                ORI.check(arrest.ori, f"{where}.ori", violations)
                if arrest.disposition not in _DISPOSITIONS:
                    violations.add(f"{where}.disposition", f"unknown disposition {arrest.disposition}")
                check_charges(arrest.charges, f"{where}.charges", violations)
        return violations.reported()

    def put(self, session: Session, record: rec.CriminalHistory) -> None:
        # ORM-level delete so the cascade removes the old child rows too.
        self.delete(session, [record.subject_id])
        session.flush()
        subject = CriminalSubject(subject_id=record.subject_id)
        subject.set_descriptors(record.descriptors)
        subject.arrests = [
            ArrestRow(
                arrested_at=arrest.arrested_at.ToDatetime(tzinfo=dt.UTC),
                ori=arrest.ori,
                disposition=int(arrest.disposition),
                charges=[
                    ChargeRow(ncic_code=c.ncic_code, literal=c.literal, counts=c.counts or 1)
                    for c in arrest.charges
                ],
            )
            for arrest in record.arrests
        ]
        session.add(subject)

    def get(self, session: Session, subject_ids: Sequence[str]) -> dict[str, rec.CriminalHistory]:
        rows = session.scalars(
            select(CriminalSubject)
            .where(CriminalSubject.subject_id.in_(list(subject_ids)))
            .options(selectinload(CriminalSubject.arrests).selectinload(ArrestRow.charges))
        )
        found: dict[str, rec.CriminalHistory] = {}
        for row in rows:
            history = rec.CriminalHistory(subject_id=row.subject_id, descriptors=row.descriptors())
            for arrest in row.arrests:
                message = history.arrests.add(
                    ori=arrest.ori, disposition=rec.Disposition.ValueType(arrest.disposition)
                )
                message.arrested_at.FromDatetime(arrest.arrested_at)
                message.charges.extend(
                    rec.Charge(ncic_code=c.ncic_code, literal=c.literal, counts=c.counts)
                    for c in arrest.charges
                )
            found[row.subject_id] = history
        return found

    def delete(self, session: Session, subject_ids: Sequence[str]) -> None:
        for row in session.scalars(
            select(CriminalSubject).where(CriminalSubject.subject_id.in_(list(subject_ids)))
        ):
            session.delete(row)
