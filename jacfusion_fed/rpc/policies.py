"""The deployment's rules: which role may call which method of each jacfusion service.

Each server starts with one of these :class:`~jacfusion_fed.rpc.auth.RpcPolicy` objects
(enforced by :class:`~jacfusion_fed.rpc.auth.AuthInterceptor`, fail-closed: a method in no
rule is denied to everyone).
"""

from __future__ import annotations

from jacfusion_fed.privacy.cert_names import ROLES
from jacfusion_fed.rpc.auth import RpcPolicy

__all__ = [
    "FUSION_SERVICE",
    "FUSION_SERVICE_POLICY",
    "HEALTH_METHODS",
    "MODALITY_SERVICE",
    "MODALITY_SERVICE_POLICY",
    "REFLECTION_METHODS",
    "REFLECTION_V1_METHODS",
]

MODALITY_SERVICE = "jacfusion.v1.ModalityService"
FUSION_SERVICE = "jacfusion.v1.FusionService"

#: Health checks and server reflection (v1 and v1alpha, :mod:`jacfusion_fed.rpc.reflection`):
#: open to every authenticated principal of the deployment, on every server.
HEALTH_METHODS = "/grpc.health.v1.Health/*"
REFLECTION_METHODS = "/grpc.reflection.v1alpha.ServerReflection/*"
REFLECTION_V1_METHODS = "/grpc.reflection.v1.ServerReflection/*"

#: Owner servers: only the coordinator may call ModalityService, except the live-record
#: methods, which only requesters may call.
MODALITY_SERVICE_POLICY = RpcPolicy.of(
    {
        f"/{MODALITY_SERVICE}/*": {"coordinator"},
        f"/{MODALITY_SERVICE}/PutRecords": {"requester"},
        f"/{MODALITY_SERVICE}/DeleteRecords": {"requester"},
        HEALTH_METHODS: set(ROLES),
        REFLECTION_METHODS: set(ROLES),
        REFLECTION_V1_METHODS: set(ROLES),
    }
)

#: The coordinator's FusionService: only requesters predict; GetModelInfo for requesters and
#: the coordinator's own operators.
FUSION_SERVICE_POLICY = RpcPolicy.of(
    {
        f"/{FUSION_SERVICE}/Predict": {"requester"},
        f"/{FUSION_SERVICE}/PredictStream": {"requester"},
        f"/{FUSION_SERVICE}/GetModelInfo": {"requester", "coordinator"},
        HEALTH_METHODS: set(ROLES),
        REFLECTION_METHODS: set(ROLES),
        REFLECTION_V1_METHODS: set(ROLES),
    }
)
