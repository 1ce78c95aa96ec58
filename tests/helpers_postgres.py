"""A PostgreSQL cluster for the tests of one module (started once, stopped by PID), and one
fresh database per test on it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from jacfusion_fed.reliability.postgres import PostgresCluster, postgres_missing

_names = itertools.count()


def cluster() -> Iterator[PostgresCluster]:
    """Body of a module-scoped fixture: skips where no PostgreSQL server can be started."""
    reason = postgres_missing()
    if reason:
        pytest.skip(reason)
    with PostgresCluster() as pg:
        yield pg


def fresh_database(pg: PostgresCluster, prefix: str = "t") -> str:
    """A new, empty database on ``pg``; returns its URI."""
    import psycopg

    name = f"{prefix}{next(_names)}"
    with psycopg.connect(pg.uri, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return pg.uri.rsplit("/", 1)[0] + f"/{name}"
