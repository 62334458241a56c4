"""Parsing GenerateRequest bytes so that bad UTF-8 is an INVALID_ARGUMENT that names the field.

proto3 `string` fields must hold UTF-8; Python's protobuf refuses to parse a message that breaks
this, with an error that names no field, and gRPC would answer INTERNAL ("Exception deserializing
request"). The router registers `RequestParser.parse` as the request deserializer instead: on a
parse error it re-reads the bytes with a mirror of router.proto whose strings are `bytes`, finds the
offending field and returns a `BadRequest` that the handler turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from pdserve.v1 import router_pb2

_MIRROR_PACKAGE = "pdserve.v1.lenient"


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request that could not be parsed; `field` is the path a client would recognise."""

    field: str
    message: str


def _mirror_file() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    router_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "pdserve/v1/router_lenient.proto"
    fdp.package = _MIRROR_PACKAGE
    fdp.ClearField("service")
    for msg in fdp.message_type:
        for field in msg.field:
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if field.type_name.startswith(".pdserve.v1."):
                field.type_name = "." + _MIRROR_PACKAGE + field.type_name[len(".pdserve.v1"):]
    return fdp


def _is_repeated(field: object) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.28 (`label` is gone in 7)
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)  # type: ignore[attr-defined]


def _first_bad_utf8(msg: Message, prefix: str = "") -> str | None:
    """Path of the first bytes field (in the mirror) that is not valid UTF-8."""
    for field, value in msg.ListFields():
        path = prefix + field.name
        repeated = _is_repeated(field)
        items = value if repeated else [value]
        for i, item in enumerate(items):
            item_path = f"{path}[{i}]" if repeated else path
            if isinstance(item, bytes):
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError:
                    return item_path
            elif isinstance(item, Message):
                found = _first_bad_utf8(item, item_path + ".")
                if found:
                    return found
    return None


class RequestParser:
    """Request deserializer for Router.Generate: GenerateRequest, or BadRequest (never raises)."""

    def __init__(self) -> None:
        pool = descriptor_pool.DescriptorPool()
        pool.Add(_mirror_file())
        mirror = pool.FindMessageTypeByName(_MIRROR_PACKAGE + ".GenerateRequest")
        self._mirror_cls = message_factory.GetMessageClass(mirror)

    def parse(self, data: bytes) -> router_pb2.GenerateRequest | BadRequest:
        try:
            return router_pb2.GenerateRequest.FromString(data)
        except DecodeError:
            return self._explain(data)

    def _explain(self, data: bytes) -> BadRequest:
        try:
            lenient = self._mirror_cls.FromString(data)
        except DecodeError:
            return BadRequest("request", "GenerateRequest: malformed protobuf message")
        path = _first_bad_utf8(lenient)
        if path is None:
            return BadRequest("request", "GenerateRequest: malformed protobuf message")
        return BadRequest(path, f"{path}: not valid UTF-8 (string fields must be UTF-8)")
