"""gRPC layer: generated ``jacfusion.v1`` API (``jacfusion_fed.rpc.jacfusion.v1``), transport
security (:mod:`~jacfusion_fed.rpc.tls`), peer authorisation (:mod:`~jacfusion_fed.rpc.auth`)
and the matrix codec (:mod:`~jacfusion_fed.rpc.matrix`). Regenerate the API code with
``python -m jacfusion_fed.rpc.codegen``.
"""
