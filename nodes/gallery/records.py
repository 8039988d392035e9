"""The contract between the shared gallery server and a node's record model.

IAFIS keeps criminal histories and IDENT immigration histories; each node brings
a :class:`RecordStore` that persists its record message in its own tables, in the
same SQLite/PostgreSQL database (and transaction) as the gallery's templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, Session, mapped_column

from fedprint.migrations import Migrations
from fedprint.records.v1 import records_pb2 as rec
from fedprint.rpc import FieldViolation

RecordT = TypeVar("RecordT", bound=Message)


class RecordStore(Protocol[RecordT]):
    """Persists one kind of subject record beside the gallery's templates."""

    #: Name of the ``oneof record`` field carrying this record in EnrollRequest and Candidate.
    record_field: str
    #: The schema history of this record model's tables, which live beside the template tables
    #: (its own Alembic revisions and version table; the store applies them when it opens).
    migrations: Migrations

    def validate(self, record: RecordT, subject_id: str, field: str) -> list[FieldViolation]:
        """Problems with ``record`` as an enrollment of ``subject_id`` (empty when fine)."""
        ...

    def put(self, session: Session, record: RecordT) -> None:
        """Inserts or replaces the record of ``record.subject_id``."""
        ...

    def get(self, session: Session, subject_ids: Sequence[str]) -> dict[str, RecordT]:
        """The stored records of those subjects that have one."""
        ...

    def delete(self, session: Session, subject_ids: Sequence[str]) -> None:
        """Deletes the records of these subjects (absent ones are ignored)."""
        ...


class DescriptorColumns:
    """Synthetic subject descriptors, stored the same way by both record models."""

    sex: Mapped[str] = mapped_column(String(1))
    year_of_birth: Mapped[int] = mapped_column(Integer)
    height_cm: Mapped[int] = mapped_column(Integer)
    place_of_birth: Mapped[str] = mapped_column(String(2))

    def set_descriptors(self, d: rec.SubjectDescriptors) -> None:
        self.sex, self.year_of_birth = d.sex, d.year_of_birth
        self.height_cm, self.place_of_birth = d.height_cm, d.place_of_birth

    def descriptors(self) -> rec.SubjectDescriptors:
        return rec.SubjectDescriptors(
            sex=self.sex,
            year_of_birth=self.year_of_birth,
            height_cm=self.height_cm,
            place_of_birth=self.place_of_birth,
        )


def check_subject_id(record_subject_id: str, subject_id: str, field: str) -> list[FieldViolation]:
    """A record must name the subject it is enrolled under (or leave the id empty)."""
    if record_subject_id not in ("", subject_id):
        return [
            FieldViolation(f"{field}.subject_id", f"record names {record_subject_id!r}, not {subject_id!r}")
        ]
    return []
