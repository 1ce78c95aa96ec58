"""``jacfusion-fed proxy``: a fault-injecting TCP proxy, for manual fault drills."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer

from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.options import HostOpt
from jacfusion_fed.cli.render import err

__all__ = ["proxy", "register"]


def proxy(
    upstream: Annotated[str, typer.Option(help="HOST:PORT to forward to.")],
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Local port (0: any).", min=0)] = 0,
    delay: Annotated[float, typer.Option(help="Added latency per chunk (s).", min=0)] = 0.0,
    drop_rate: Annotated[
        float, typer.Option(help="Probability of dropping a chunk.", min=0, max=1)
    ] = 0.0,
    stall_every: Annotated[
        float, typer.Option(help="Blackhole the link every this many seconds (0: never).")
    ] = 0.0,
    stall_for: Annotated[float, typer.Option(help="... for this many seconds.")] = 2.0,
) -> None:
    """A fault-injecting TCP proxy on --host (point the coordinator's --owner at it), until
    SIGTERM/SIGINT."""
    from jacfusion_fed.reliability.proxy import FaultProxy

    try:
        running = FaultProxy(upstream, host=host, port=port).start()
    except ValueError as exc:
        raise CliError(f"--host: {exc}") from None
    running.set(delay_s=delay, drop_rate=drop_rate)
    err().print(f"proxy {running.host}:{running.port} -> {upstream}")
    done = threading.Event()

    def stop(*_: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not done.is_set():
        if stall_every > 0 and not done.wait(stall_every):
            running.set(stalled=True)
            done.wait(stall_for)
            running.set(stalled=False)
        else:
            done.wait(1.0)
    running.stop()
    err().print(f"proxy stopped; {vars(running.stats)}")


def register(app: typer.Typer) -> None:
    app.command("proxy")(proxy)
