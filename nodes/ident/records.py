"""IDENT record model: subjects with their immigration status, prior removals and encounters."""

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
    ENCOUNTER_ID,
    LOCATION,
    Violations,
    check_count,
    check_descriptors,
    check_timestamp,
)
from nodes.gallery.records import DescriptorColumns, check_subject_id


class _Base(DeclarativeBase):
    pass


class ImmigrationSubject(DescriptorColumns, _Base):
    __tablename__ = "ident_subjects"
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[int] = mapped_column(Integer)
    prior_removals: Mapped[int] = mapped_column(Integer)
    encounters: Mapped[list[EncounterRow]] = relationship(
        back_populates="subject", cascade="all, delete-orphan", order_by="EncounterRow.encountered_at"
    )


class EncounterRow(_Base):
    __tablename__ = "ident_encounters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_id: Mapped[str] = mapped_column(
        ForeignKey("ident_subjects.subject_id", ondelete="CASCADE"), index=True
    )
    encounter_id: Mapped[str] = mapped_column(String(64))
    encountered_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    type: Mapped[int] = mapped_column(Integer)
    location: Mapped[str] = mapped_column(String(32))
    subject: Mapped[ImmigrationSubject] = relationship(back_populates="encounters")


#: Encounters in one immigration history.
MAX_ENCOUNTERS = 500
MAX_PRIOR_REMOVALS = 100
_STATUSES = frozenset(rec.ImmigrationStatus.values())
_ENCOUNTER_TYPES = frozenset(rec.EncounterType.values())


class ImmigrationHistoryStore:
    """:class:`nodes.gallery.records.RecordStore` for ``fedprint.records.v1.ImmigrationHistory``."""

    record_field = "immigration_history"
    migrations = Migrations(
        name="ident",
        versions=Path(__file__).with_name("migrations"),
        metadata=_Base.metadata,
        baseline="0001",
        baseline_table="ident_subjects",
    )

    def validate(self, record: rec.ImmigrationHistory, subject_id: str, field: str) -> list[FieldViolation]:
        violations = Violations()
        violations.extend(check_subject_id(record.subject_id, subject_id, field))
        check_descriptors(record.descriptors, f"{field}.descriptors", violations)
        if record.status == rec.IMMIGRATION_STATUS_UNSPECIFIED or record.status not in _STATUSES:
            violations.add(f"{field}.status", "immigration status must be set to a known status")
        if record.prior_removals > MAX_PRIOR_REMOVALS:
            violations.add(
                f"{field}.prior_removals", f"{record.prior_removals}, at most {MAX_PRIOR_REMOVALS}"
            )
        if check_count(
            len(record.encounters), MAX_ENCOUNTERS, f"{field}.encounters", violations, "encounters"
        ):
            for i, encounter in enumerate(record.encounters):
                where = f"{field}.encounters[{i}]"
                ENCOUNTER_ID.check(encounter.encounter_id, f"{where}.encounter_id", violations)
                check_timestamp(encounter.encountered_at, f"{where}.encountered_at", violations)
                if encounter.type not in _ENCOUNTER_TYPES:
                    violations.add(f"{where}.type", f"unknown encounter type {encounter.type}")
                LOCATION.check(encounter.location, f"{where}.location", violations)
        return violations.reported()

    def put(self, session: Session, record: rec.ImmigrationHistory) -> None:
        # ORM-level delete so the cascade removes the old child rows too.
        self.delete(session, [record.subject_id])
        session.flush()
        subject = ImmigrationSubject(
            subject_id=record.subject_id, status=int(record.status), prior_removals=record.prior_removals
        )
        subject.set_descriptors(record.descriptors)
        subject.encounters = [
            EncounterRow(
                encounter_id=e.encounter_id,
                encountered_at=e.encountered_at.ToDatetime(tzinfo=dt.UTC),
                type=int(e.type),
                location=e.location,
            )
            for e in record.encounters
        ]
        session.add(subject)

    def get(self, session: Session, subject_ids: Sequence[str]) -> dict[str, rec.ImmigrationHistory]:
        rows = session.scalars(
            select(ImmigrationSubject)
            .where(ImmigrationSubject.subject_id.in_(list(subject_ids)))
            .options(selectinload(ImmigrationSubject.encounters))
        )
        found: dict[str, rec.ImmigrationHistory] = {}
        for row in rows:
            history = rec.ImmigrationHistory(
                subject_id=row.subject_id,
                descriptors=row.descriptors(),
                status=rec.ImmigrationStatus.ValueType(row.status),
                prior_removals=row.prior_removals,
            )
            for e in row.encounters:
                message = history.encounters.add(
                    encounter_id=e.encounter_id, type=rec.EncounterType.ValueType(e.type), location=e.location
                )
                message.encountered_at.FromDatetime(e.encountered_at)
            found[row.subject_id] = history
        return found

    def delete(self, session: Session, subject_ids: Sequence[str]) -> None:
        rows = session.scalars(
            select(ImmigrationSubject).where(ImmigrationSubject.subject_id.in_(list(subject_ids)))
        )
        for row in rows:
            session.delete(row)
