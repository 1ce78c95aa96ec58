"""Server reflection, both versions: ``grpc.reflection.v1`` (what current clients such as
grpcurl and Postman ask first) and ``grpc.reflection.v1alpha`` (older clients).

``grpcio-reflection`` serves only v1alpha. The v1 protocol is the same messages under another
package name (every field number and type equal), so one servicer answers both: it is
registered a second time under ``grpc.reflection.v1.ServerReflection``. The v1 file
descriptor, made from v1alpha's by renaming the package, is added to the default descriptor
pool, so that reflection also describes the v1 service itself; :data:`V1_FILE` and
:func:`v1_messages` give clients (the tests) the real v1 message types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = [
    "SERVICE_NAMES",
    "V1ALPHA_SERVICE",
    "V1_FILE",
    "V1_SERVICE",
    "enable_reflection",
    "v1_messages",
]

V1ALPHA_SERVICE: Final[str] = reflection.SERVICE_NAME
V1_SERVICE: Final = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES: Final = (V1_SERVICE, V1ALPHA_SERVICE)
V1_FILE: Final = "grpc/reflection/v1/reflection.proto"
_ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = _V1_PACKAGE
    proto.ClearField("options")

    def rename(type_name: str) -> str:
        prefix = f".{_ALPHA_PACKAGE}."
        return (
            f".{_V1_PACKAGE}." + type_name[len(prefix) :]
            if type_name.startswith(prefix)
            else type_name
        )

    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = rename(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    return proto


def _ensure_v1_descriptor() -> Any:
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())
        return pool.FindFileByName(V1_FILE)


def v1_messages() -> tuple[Any, Any]:
    """``(ServerReflectionRequest, ServerReflectionResponse)`` of ``grpc.reflection.v1``."""
    file = _ensure_v1_descriptor()
    return (
        message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionRequest"]),
        message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionResponse"]),
    )


def enable_reflection(services: Sequence[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server`` for ``services`` (plus both reflection
    services)."""
    _ensure_v1_descriptor()
    servicer = reflection.ReflectionServicer((*services, *SERVICE_NAMES))
    for name in SERVICE_NAMES:  # same bytes on the wire: v1alpha's (de)serializers serve v1
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}),)
        )
