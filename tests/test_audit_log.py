"""The audit log on its own: chain, checkpoints, verification (and what it cannot detect),
rotation across files, repair of a cut line, a full disk, two writers, ``show``."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from helpers_audit import CORRUPTIONS, corrupt

from jacfusion_fed.audit import (
    AuditLog,
    AuditUnavailable,
    Peer,
    Rotation,
    Signer,
    access_fields,
    accesses,
    load_cert,
    segments,
    verify,
)
from jacfusion_fed.privacy.certs import generate_deployment_certs
from jacfusion_fed.privacy.pseudonyms import Pseudonymizer

SERVICE = {"role": "owner", "name": "audio-co", "modality": "audio"}
PZ = Pseudonymizer(b"k" * 32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    certs = generate_deployment_certs(root, {"audio-co": "audio", "image-co": "image"})
    return {"audio": certs.owner_dirs["audio-co"], "image": certs.owner_dirs["image-co"]}


def _signer(d: Path) -> Signer:
    return Signer.from_files(d / "cert.pem", d / "key.pem")


def _fill(log: AuditLog, n: int, start: int = 0) -> list[str]:
    ids = [f"patient {i}" for i in range(start, start + n)]
    for pid in ids:
        log.access(
            access_fields(
                "GetLogits",
                peer=Peer("coordinator", "coordinator", fingerprint="sha256:ab"),
                rpc="/jacfusion.v1.ModalityService/GetLogits",
                ids=[PZ(pid), pid],  # a raw id slipped in: counted, never written
                model_versions={"audio": "0123456789abcdef"},
            )
        )
    return ids


def test_intact_log_verifies_with_its_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, service=SERVICE, signer=_signer(pki["audio"]), checkpoint_every=4)
    log.start()
    raw = _fill(log, 10)
    log.close()
    report = verify(path, cert=load_cert(pki["audio"]))
    assert report.ok, report.problem
    assert report.entries == len(path.read_text().splitlines()) and report.checkpoints >= 3
    assert report.signatures_checked == report.checkpoints
    assert report.head_hash == json.loads(path.read_text().splitlines()[-1])["hash"]
    assert any("--expect-head" in line for line in report.limits)
    text = path.read_text()
    assert all(pid not in text for pid in raw) and PZ(raw[0]) in text
    entry = json.loads(text.splitlines()[2])
    assert (
        entry["n_ids"] == 2
        and entry["n_not_pseudonym"] == 1
        and entry["pseudonyms"] == [PZ(raw[0])]
    )
    # another service's certificate: the first checkpoint fails
    other = verify(path, cert=load_cert(pki["image"]))
    assert not other.ok and "checkpoint" in other.problem.reason  # type: ignore[union-attr]
    assert other.problem.line == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_each_corruption_is_named(tmp_path: Path, pki: dict[str, Path], how: str) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, service=SERVICE, signer=_signer(pki["audio"]), checkpoint_every=5)
    log.start()
    _fill(log, 12)
    log.close()
    copy = tmp_path / f"{how}.jsonl"
    line = corrupt(path, copy, how, 7)
    report = verify(copy, cert=load_cert(pki["audio"]))
    assert not report.ok
    assert report.problem is not None and report.problem.line == line, report.problem
    assert report.problem.file == copy
    if how == "insert":
        assert "inserted" in report.problem.reason
    if how == "delete":
        assert "missing" in report.problem.reason


def test_what_verify_cannot_detect_and_expect_head(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, service=SERVICE, signer=_signer(pki["audio"]))
    log.start()
    _fill(log, 6)
    recorded = log.head[1]
    _fill(log, 3, start=6)
    log.checkpoint()
    log.close(stop_event=False)
    lines = path.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:5]))  # the tail removed: nothing contradicts it
    assert verify(cut, cert=load_cert(pki["audio"])).ok
    report = verify(cut, cert=load_cert(pki["audio"]), expect_head=recorded)
    assert not report.ok and "cut short" in report.problem.reason  # type: ignore[union-attr]
    assert verify(path, expect_head=recorded).ok  # the full log still holds that head
    # without --cert a rewritten chain passes; with it the checkpoint after the edit fails
    entries = [json.loads(x) for x in lines]
    from jacfusion_fed.audit.chain import seal

    entries[2]["n_ids"] = 99
    prev = entries[1]["hash"]
    rewritten = []
    for entry in entries[:2]:
        rewritten.append(json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n")
    for entry in entries[2:]:
        entry.pop("hash")
        entry["prev"] = prev
        rewritten.append(seal(entry).decode())
        prev = entry["hash"]
    forged = tmp_path / "forged.jsonl"
    forged.write_text("".join(rewritten))
    assert verify(forged).ok
    bad = verify(forged, cert=load_cert(pki["audio"]))  # the last checkpoint no longer fits
    assert not bad.ok and "signature" in bad.problem.reason  # type: ignore[union-attr]
    assert bad.problem.line == len(lines)  # type: ignore[union-attr]


def test_rotation_continues_the_chain(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(
        path, service=SERVICE, signer=_signer(pki["audio"]), rotation=Rotation(max_bytes=3000)
    )
    log.start()
    _fill(log, 30)
    log.close()
    files = segments(path)
    assert len(files) >= 3 and files[-1] == path
    report = verify(path, cert=load_cert(pki["audio"]))
    assert report.ok and report.files == files
    for old in files[:-1]:  # every closed file ends with a signed checkpoint
        assert json.loads(old.read_text().splitlines()[-1])["kind"] == "checkpoint"
    files[1].unlink()  # a whole file removed
    gone = verify(path)
    assert not gone.ok and "missing" in gone.problem.reason  # type: ignore[union-attr]
    files[0].unlink()  # the oldest removed: the chain no longer starts at the beginning
    assert "starts at seq" in verify(path).problem.reason  # type: ignore[union-attr]


def test_rotation_by_age(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, service=SERVICE, rotation=Rotation.parse("1s"))
    _fill(log, 2)
    log._started -= 5  # the file is five seconds old
    _fill(log, 1)
    log.close()
    assert len(segments(path)) == 2 and verify(path).ok


def test_rotation_spec() -> None:
    assert Rotation.parse("64MiB") == Rotation(64 * 1024**2, None)
    assert Rotation.parse("500MB,1d") == Rotation(500 * 1000**2, 86400.0)
    assert Rotation.parse("none") == Rotation()
    with pytest.raises(ValueError, match="'12 parsecs'"):
        Rotation.parse("12 parsecs")


def test_a_cut_last_line_is_repaired_and_logged(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, service=SERVICE)
    _fill(log, 3)
    log.close(stop_event=False)
    with open(path, "ab") as fh:
        fh.write(b'{"v":1,"seq":3,"ti')  # a crash in the middle of a write
    assert "incomplete" in verify(path).problem.reason  # type: ignore[union-attr]
    log = AuditLog(path, service=SERVICE)
    _fill(log, 1)
    log.close(stop_event=False)
    assert verify(path).ok
    repair = [json.loads(x) for x in path.read_text().splitlines()][3]
    assert repair["event"] == "repair" and repair["detail"] == {"cut": 18}


def test_full_disk_refuses(tmp_path: Path) -> None:
    full = AuditLog(Path("/dev/full"), service=SERVICE, reserve_bytes=0)
    with pytest.raises(AuditUnavailable, match="No space left"):
        _fill(full, 1)
    assert full.failure is not None
    full.close(stop_event=False)
    nearly = AuditLog(tmp_path / "a.jsonl", service=SERVICE, reserve_bytes=1 << 62)
    with pytest.raises(AuditUnavailable, match="bytes free"):
        nearly.check_writable()
    nearly.close(stop_event=False)


def test_two_writers_share_one_chain(tmp_path: Path) -> None:
    """The service and an operator's CLI command append to the same log at once."""
    path = tmp_path / "a.jsonl"
    a = AuditLog(path, service=SERVICE)
    b = AuditLog(path, service={"role": "owner", "name": "cli"})
    threads = [threading.Thread(target=_fill, args=(w, 40)) for w in (a, b, a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close(stop_event=False)
    b.close(stop_event=False)
    report = verify(path)
    assert report.ok and report.entries == 120


def test_periodic_checkpoint(tmp_path: Path, pki: dict[str, Path]) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, service=SERVICE, signer=_signer(pki["audio"]), checkpoint_interval=0.2)
    log.start()
    _fill(log, 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if json.loads(path.read_text().splitlines()[-1])["kind"] == "checkpoint":
            break
        time.sleep(0.05)
    log.close(stop_event=False)
    assert json.loads(path.read_text().splitlines()[3])["kind"] == "checkpoint"


def test_show_lists_one_patients_accesses(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, service=SERVICE)
    _fill(log, 5)
    log.close(stop_event=False)
    found = list(accesses(path, {PZ("patient 3")}))
    assert len(found) == 1 and found[0]["pseudonym"] == PZ("patient 3")
    assert "pseudonyms" not in found[0] and found[0]["line"] == 4
    assert list(accesses(path, {PZ("nobody")})) == []


def test_readme_quotes_the_audit_latency_file() -> None:
    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "docs" / "results" / "audit-latency.json").read_text())
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## Audit trail") : readme.index("## Private FedAvg")]
    v, ci = results["variants"], results["added_p50_ms_ci95"]
    for name in ("none", "entry", "checkpoint"):
        assert f"{v[name]['p50_ms']:.1f} ms" in section, name
    for name in ("entry", "checkpoint"):
        low, high = ci[name]
        assert f"{results['added_p50_ms'][name]:+.1f} ms" in section, name
        assert f"[{low:+.1f}, {high:+.1f}]" in section, name
    assert results["log_dir_fs"] in section
    load = max(results["environment"]["load_before"] + results["environment"]["load_after"])
    said = re.search(r"load average about (\d+)", section)
    assert said and abs(int(said.group(1)) - load) <= 0.25 * load
