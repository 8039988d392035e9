"""Hypothesis strategies built from protobuf descriptors: any message of any type, valid messages
mutated field by field, and serialized messages mutated byte by byte.

Every field type of proto3 is covered (scalars over their whole range, NaN and infinities,
unknown enum numbers, nested messages to a bounded depth, repeated fields, oneofs). Strings and
bytes mix arbitrary values with ones that sit at the validators' edges: identifiers with a
trailing newline, non-ASCII digits, over-long values, template records with a valid header.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

#: Strings at the validators' edges.
EDGE_STRINGS = (
    "",
    "A",
    "XX0010000",
    "XX0010000\n",
    "xx0010000",
    "XX001000",
    "1201",
    "1201\n",
    "0999\n",
    "١٢٠١",
    "²²⁹⁹",
    "TCN-1",
    "TCN1\n",
    "UCN-0000001",
    "FIN-0000001\n",
    "-leading-dash",
    "A" * 64,
    "A" * 65,
    "B" * 5000,
    "\x00",
    "line\nbreak",
    "\u202eevil",
    "' OR 1=1 --",
    "../../etc/passwd",
    "M",
    "Q",
    "US",
    "PORT-A01",
)
#: Bytes at the template decoder's edges: a valid ISO/IEC 19794-2 header with odd contents.
EDGE_BYTES = (
    b"",
    b"FMR\x00",
    b"FMR\x00 20\x00",
    b"FMR\x00 20\x00\x00\x00\x00\x1a" + bytes(14) + b"\x01\x00",
    b"FMR\x00 20\x00\xff\xff\xff\xff" + bytes(16),
    b"FMR\x00 20\x00\x00\x00\x00\x20\x00\x00\x01\xf4\x01\xf4\x00\xc5\x00\xc5\x01\x00\x01\x00\x64\x01"
    + b"\xff" * 6,
    b"\xff" * 64,
)


class Seeds(list[Any]):
    """Valid messages (or their bytes) to mutate; shown by count only, since Hypothesis writes the
    arguments of a strategy into its reports."""

    def __repr__(self) -> str:
        return f"Seeds(<{len(self)} items>)"


class FuzzContext:
    """Values worth drawing besides random ones (identifiers that exist in the system under test)."""

    def __init__(self, strings: Sequence[str] = (), blobs: Sequence[bytes] = ()) -> None:
        self.strings = st.sampled_from([*EDGE_STRINGS, *strings])
        self.blobs = st.sampled_from([*EDGE_BYTES, *blobs])

    def __repr__(self) -> str:
        return "FuzzContext()"


def _scalar(field: FieldDescriptor, context: FuzzContext) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, -1 if low < 0 else 2]))
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(context.strings, st.text(max_size=80))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(context.blobs, st.binary(max_size=300))
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise TypeError(f"no strategy for field type {kind}")


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def field_values(field: FieldDescriptor, depth: int, context: FuzzContext) -> st.SearchStrategy[Any]:
    """Values for one field: a list for a repeated field, else one value."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        element: st.SearchStrategy[Any] = messages(field.message_type, depth - 1, context)
    else:
        element = _scalar(field, context)
    if _is_repeated(field):
        # Up to a dozen entries: past the ten fingers a ten-print may hold.
        return st.lists(element, max_size=12 if depth > 1 else 3)
    return element


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if _is_repeated(field):
        target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def messages(
    descriptor: Descriptor, depth: int = 4, context: FuzzContext | None = None
) -> st.SearchStrategy[Message]:
    """Any message of ``descriptor``'s type, nested messages down to ``depth`` levels (unset below)."""
    context = context or FuzzContext()
    cls = message_factory.GetMessageClass(descriptor)
    if depth <= 0:
        return st.builds(cls)
    optional = {field.name: field_values(field, depth, context) for field in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            # Setting a second member of a oneof clears the first, as on the wire.
            _assign(message, descriptor.fields_by_name[name], value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


def _all_fields(message: Message) -> list[tuple[Message, FieldDescriptor]]:
    """Every field of every message present in a tree, set or not, as (owning message, field)."""
    found: list[tuple[Message, FieldDescriptor]] = []
    for field in message.DESCRIPTOR.fields:
        found.append((message, field))
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        if _is_repeated(field):
            for child in getattr(message, field.name):
                found.extend(_all_fields(child))
        elif message.HasField(field.name):
            found.extend(_all_fields(getattr(message, field.name)))
    return found


@st.composite
def mutated(draw: st.DrawFn, seeds: Sequence[Message], context: FuzzContext | None = None) -> Message:
    """One of ``seeds`` (valid messages) with up to three fields, picked alike from anywhere in the
    message tree, replaced, cleared, or (repeated fields) truncated or duplicated; with none, the
    seed as it is."""
    context = context or FuzzContext()
    message = seeds[draw(st.integers(0, len(seeds) - 1))]  # by index: no repr of the seeds
    copy = type(message)()
    copy.CopyFrom(message)
    for _ in range(draw(st.integers(0, 3))):
        fields = _all_fields(copy)
        if not fields:
            break  # a message without fields (GetStatsRequest): nothing to change
        # Uniformly over the tree: Hypothesis's integers lean towards small values, which would
        # keep hitting the first fields.
        target, field = fields[draw(st.randoms(use_true_random=False)).randrange(len(fields))]
        value = getattr(target, field.name)
        action = draw(st.sampled_from(["replace", "replace", "clear", "truncate", "duplicate"]))
        if action == "clear":
            target.ClearField(field.name)
        elif action == "truncate" and _is_repeated(field) and len(value):
            del value[draw(st.integers(0, len(value) - 1)) :]
        elif action == "duplicate" and _is_repeated(field) and len(value):
            value.extend(list(value)[: draw(st.integers(1, len(value)))])
        else:
            target.ClearField(field.name)
            _assign(target, field, draw(field_values(field, 2, context)))
    return copy


@st.composite
def mutated_bytes(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    """A serialized message with bytes flipped, cut, inserted or repeated: wire-format damage that
    no message object can express (bad varints, lengths past the end, invalid UTF-8 in strings)."""
    data = bytearray(seeds[draw(st.integers(0, len(seeds) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            end = draw(st.integers(at, len(data)))
            data[at:at] = data[at:end]
    return bytes(data)


def _bytes_fields(message: Message) -> list[tuple[Message, str]]:
    """Every set bytes field in a message tree, as (owning message, field name)."""
    found: list[tuple[Message, str]] = []
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for child in value if _is_repeated(field) else [value]:
                found.extend(_bytes_fields(child))
        elif field.type == FieldDescriptor.TYPE_BYTES and not _is_repeated(field):
            found.append((message, field.name))
    return found


@st.composite
def damaged_payload(draw: st.DrawFn, seeds: Sequence[Message]) -> Message:
    """One of ``seeds`` with the bytes of one of its bytes fields (a template record) damaged,
    everything else left valid: the damage reaches the decoders behind the validators."""
    message = seeds[draw(st.integers(0, len(seeds) - 1))]
    copy = type(message)()
    copy.CopyFrom(message)
    fields = _bytes_fields(copy)
    if fields:
        owner, name = fields[draw(st.integers(0, len(fields) - 1))]
        setattr(owner, name, draw(mutated_bytes(Seeds([getattr(owner, name)]))))
    return copy
