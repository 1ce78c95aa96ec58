"""``submit`` of any number of records: batches under the server's limit, a failure that names
the batch and the record and what was stored, a rerun that finishes idempotently (through the
CLI as the README writes it, against an owner served in-process), and the batch validation
that names the same first bad record as checking records one by one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from jacfusion_fed.cli import app
from jacfusion_fed.clients.serve import serve_owner
from jacfusion_fed.owner import OwnerWorkspace
from jacfusion_fed.owner.input_spec import InputSpec, RecordError
from jacfusion_fed.owner.model_import import import_model
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer, generate_key, write_key
from jacfusion_fed.rpc.tls import TlsFiles

N, BATCH, BAD = 2500, 500, 1700  # five batches; record 1700 (in batch 4) is out of range


def test_submit_any_number_of_records_fails_clearly_and_reruns(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), model)
    key = write_key(tmp_path / "k.key", generate_key())
    pz = Pseudonymizer.from_file(key)
    ws = OwnerWorkspace(tmp_path / "ws", "ecg", None, pz)
    import_model(
        ws, model, class_counts=[1, 1, 1], input_spec=InputSpec.create((6,), "float32", (0, 1))
    )
    certs = generate_deployment_certs(tmp_path / "certs", {"ecg-co": "ecg"}, ["alice"])
    server = serve_owner(ws, TlsFiles.from_dir(certs.owner_dirs["ecg-co"]), max_workers=4)
    try:
        x = np.random.default_rng(0).random((N, 6)).astype(np.float32)
        x[BAD, 2] = 2.0
        ids = np.array([f"patient {i:05d}" for i in range(N)])
        inputs = tmp_path / "export.npz"
        np.savez(inputs, ids=ids, x=x)
        argv = [
            "submit",
            "--owner",
            server.target,
            "--modality",
            "ecg",
            "--tls",
            str(certs.requester_dirs["alice"]),
            "--pseudonym-key",
            str(key),
            "--inputs",
            str(inputs),
            "--batch",
            str(BATCH),
        ]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())
        assert "error: INVALID_ARGUMENT: PutRecords batch 4 of 5" in text, text
        assert f"failed at record {BAD} (records 1500-1999)" in text
        assert "outside the range" in text and "stored so far:" in text
        assert "records 0-1499" in text  # batches 1-3 (and maybe 5, sent alongside)
        stored = set(ws.live.store.ids())
        local = dict(zip(pz.many([str(i) for i in ids]), range(N), strict=True))
        held = sorted(local[s] for s in stored)
        assert held[:1500] == list(range(1500)) and not set(held) & set(range(1500, 2000))
        assert set(held[1500:]) in (set(), set(range(2000, 2500)))  # batch 5: whole or absent
        # the hospital fixes the record and runs the same command again: it finishes the job
        x[BAD, 2] = 0.5
        np.savez(inputs, ids=ids, x=x)
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        assert f"{N - len(held)} new, 0 replaced, {len(held)} unchanged in 5 batch(es)" in (
            " ".join(result.output.split())
        )
        assert len(ws.live.store.ids()) == N
        some = pz.many([str(i) for i in ids[[0, BAD, N - 1]]])
        got = ws.live.store.get_many(some)
        np.testing.assert_array_equal(np.stack([got[s] for s in some]), x[[0, BAD, N - 1]])
    finally:
        server.stop(0)


def _one_by_one(spec: InputSpec, x: np.ndarray) -> str | None:
    for i in range(x.shape[0]):
        try:
            spec.validate_record(x[i], i)
        except RecordError as exc:
            return str(exc)
    return None


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    nan_at=st.lists(st.integers(0, 11), max_size=2),
    high_at=st.lists(st.integers(0, 11), max_size=2),
    ints=st.booleans(),
)
def test_batch_validation_names_the_first_bad_record(
    n: int, nan_at: list[int], high_at: list[int], ints: bool
) -> None:
    spec = InputSpec.create((2, 3), "float32", (0, 1))
    x = np.random.default_rng(n).random((n, 2, 3))
    for i in nan_at:
        x[i % n, 1, 0] = np.nan
    for i in high_at:
        x[i % n, 0, 2] = 3.0
    batch = np.nan_to_num(x, nan=5.0).astype(np.int64) if ints else x.astype(np.float32)
    want = _one_by_one(spec, batch)
    if want is None:
        spec.validate_batch(batch)
    else:
        with pytest.raises(RecordError) as info:
            spec.validate_batch(batch)
        assert str(info.value) == want


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(["a" * 64, "b" * 52, "2" * 52, "0" * 64 + "\n", "x" * 64]),
            st.text(alphabet="0123456789abcdef\n", min_size=60, max_size=66),
            st.integers(),
        ),
        max_size=8,
    )
)
def test_first_non_pseudonym_of_a_batch_matches_one_by_one(values: list[object]) -> None:
    from jacfusion_fed.privacy.pseudonyms import first_non_pseudonym, is_pseudonym

    want = next((i for i, v in enumerate(values) if not is_pseudonym(v)), None)
    assert first_non_pseudonym(values) == want
    assert first_non_pseudonym(iter(values)) == want
