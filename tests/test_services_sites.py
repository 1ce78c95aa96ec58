"""Several sites per modality online: a real :class:`Coordinator` over fake owner stubs
(injected through ``connect``, keyed by each site's address).

The oracle is the same deployment with one owner per modality: splitting a modality's
patients over sites must give the same probabilities, a site that is down or serves another
model version removes only its own patients (named in the answer), and a pseudonym held by
two sites is reported, never silently picked.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from jacfusion_fed.answer import FusedAnswer
from jacfusion_fed.cli import app
from jacfusion_fed.cli.coordinator import info_payload
from jacfusion_fed.rpc.fusion_codec import PredictOptions, answer_from_proto, predictions_to_proto
from jacfusion_fed.rpc.jacfusion.v1 import fusion_pb2
from jacfusion_fed.rpc.metrics import ServiceMetrics
from jacfusion_fed.rpc.tls import INSECURE
from jacfusion_fed.server.coordinator import Coordinator
from jacfusion_fed.server.fusion_service import FusionServicer
from jacfusion_fed.server.metrics import watch_coordinator
from jacfusion_fed.server.owner_channel import OwnerChannel
from jacfusion_fed.server.owner_links import pick_version
from jacfusion_fed.server.predict_types import (
    CoordinatorConfig,
    OwnerEndpoint,
    PredictError,
)
from jacfusion_fed.server.sites import load_sites, parse_owners

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import harness as H

SITE_A, SITE_B, IMAGE = "10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50052"
CONFIG = CoordinatorConfig(device="cpu", owner_timeout_s=0.5, registration_timeout_s=0.5)


def down_stub() -> H.FakeOwnerStub:
    def fail(_request: Any) -> Any:
        raise H.FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")

    return H.FakeOwnerStub(fail, fail, fail)


class World:
    """Audio split over two sites (``b`` holds the first half of its patients, among them the
    ones image lacks, ``a`` the rest),
    image at one site, and the same data as one owner per modality (the reference)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.whole = H.make_good_owners(seed=3, n=24)
        audio = self.whole["audio"]
        held = list(audio.logits)
        half = len(held) // 2
        self.site_ids = {SITE_A: held[half:], SITE_B: held[:half]}
        # Each site trained on part of the patients: the modality's class counts are the sum.
        north = np.floor(audio.class_counts / 2)
        self.counts = {SITE_A: north, SITE_B: audio.class_counts - north}
        self.sites = {
            t: replace(
                audio,
                logits={i: audio.logits[i] for i in ids},
                class_counts=self.counts[t],
                owner=f"audio-{'north' if t == SITE_A else 'south'}",
            )
            for t, ids in self.site_ids.items()
        }
        self.ids = H.pool_ids(self.whole)
        self._open: list[Coordinator] = []
        self.config = CONFIG

    def coordinator(self, stubs: dict[str, Any], name: str) -> Coordinator:
        endpoints = [OwnerEndpoint("audio" if t != IMAGE else "image", t) for t in stubs]
        c = Coordinator(
            self.tmp / name,
            endpoints,
            INSECURE,
            self.config,
            connect=lambda e: OwnerChannel(stubs[e.target]),
        )
        self._open.append(c)
        return c

    def split(self, **overrides: Any) -> tuple[Coordinator, dict[str, Any]]:
        stubs = {t: H.good_stub(o) for t, o in self.sites.items()}
        stubs[IMAGE] = H.good_stub(self.whole["image"])
        stubs.update({t.replace("_", "."): s for t, s in overrides.items()})
        return self.coordinator(stubs, "split"), stubs

    def reference(self, counts: Any = None, **options: Any) -> FusedAnswer:
        """The answer of one owner per modality (audio with ``counts``, default all sites')."""
        whole = self.whole["audio"]
        if counts is not None:
            whole = replace(whole, class_counts=counts)
        stubs = {SITE_A: H.good_stub(whole), IMAGE: H.good_stub(self.whole["image"])}
        ref = self.coordinator(stubs, "reference")
        return ref.predict(options.pop("ids", self.ids), PredictOptions(**options))

    def close(self) -> None:
        for c in self._open:
            c.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def rows(result: FusedAnswer, ids: list[str]) -> np.ndarray:
    index = {s: i for i, s in enumerate(result.sample_ids)}
    out: np.ndarray = result.probabilities[[index[i] for i in ids]]
    return out


def audio(result: FusedAnswer) -> Any:
    return next(c for c in result.modalities if c.modality == "audio")


@pytest.mark.parametrize("owner_chunk", [65_536, 5])
def test_patients_split_over_sites_fuse_as_one_owner(world: World, owner_chunk: int) -> None:
    world.config = replace(CONFIG, owner_chunk=owner_chunk)  # 5: several calls per site
    coordinator, stubs = world.split()
    assert coordinator.sync() == {"audio": "", "image": ""}
    # One head for the modality, registered with every site's class counts (the prior's).
    head = coordinator.head("audio")
    assert head is not None
    record = head.record
    assert record.owner == "audio-north+audio-south"
    np.testing.assert_array_equal(record.class_counts, world.whole["audio"].class_counts)
    got = coordinator.predict(world.ids)
    want = world.reference()
    assert got.sample_ids == want.sample_ids
    np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(audio(got).used, audio(want).used)
    sites = audio(got).sites
    assert [(s.target, s.error) for s in sites] == [(SITE_A, ""), (SITE_B, "")]
    assert [s.samples for s in sites] == [len(world.site_ids[t]) for t in (SITE_A, SITE_B)]
    assert audio(got).ambiguous_sample_ids == []
    # Every site was asked for every id (each answers the ones it holds).
    for t in (SITE_A, SITE_B):
        served = stubs[t].served_logits
        assert len(served) == -(-len(world.ids) // owner_chunk)
        asked = sum(len(r.batch.sample_ids) + len(r.batch.unknown_sample_ids) for r in served)
        assert asked == len(world.ids)
    # A single-site modality reports no site list (its answer is unchanged).
    image = next(c for c in got.modalities if c.modality == "image")
    assert image.sites == []
    # The site list crosses the wire (additive fields of ModalityContribution).
    decoded = answer_from_proto(predictions_to_proto(got))
    assert [s.samples for s in decoded.modalities[0].sites] == [s.samples for s in sites]


def test_site_down_removes_only_its_patients(world: World) -> None:
    coordinator, _stubs = world.split(**{SITE_B.replace(".", "_"): down_stub()})
    only_b = [i for i in world.site_ids[SITE_B] if i not in world.whole["image"].logits]
    b_with_image = [i for i in world.site_ids[SITE_B] if i in world.whole["image"].logits]
    assert only_b and b_with_image
    # Without skip_unknown_ids: the down site might hold the missing ids, so UNAVAILABLE,
    # naming the site.
    with pytest.raises(PredictError) as err:
        coordinator.predict(world.ids)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert SITE_B in err.value.message and only_b[0] in err.value.message
    got = coordinator.predict(world.ids, PredictOptions(skip_unknown_ids=True))
    assert got.unpredicted_sample_ids == sorted(only_b)
    a_ids = world.site_ids[SITE_A]
    # The head was registered while b was down: its class counts are a's alone.
    counts = world.counts[SITE_A]
    reference = world.reference(counts)
    np.testing.assert_allclose(rows(got, a_ids), rows(reference, a_ids), rtol=0, atol=1e-12)
    # Site b's patients that image holds are predicted from image alone.
    image_only = world.reference(counts, modalities=("image",), ids=b_with_image)
    np.testing.assert_allclose(
        rows(got, b_with_image), image_only.probabilities, rtol=0, atol=1e-12
    )
    contribution = audio(got)
    assert contribution.error == ""
    a_site, b_site = contribution.sites
    assert a_site.error == "" and a_site.samples == len(a_ids)
    assert b_site.target == SITE_B and b_site.error.startswith("UNAVAILABLE: ")
    assert SITE_B in b_site.error and b_site.samples == 0
    assert not any(contribution.used_mask[[got.sample_ids.index(i) for i in b_with_image]])
    # The requester's side (predict --json) names the site too.
    wire = answer_from_proto(predictions_to_proto(got))
    (site_error,) = wire.to_json([])["modalities"][0]["site_errors"]
    assert site_error.startswith(f"{SITE_B}: UNAVAILABLE: ")
    # PredictStream: every chunk says the same, and only b's audio-only patients are missing.
    chunks = list(
        coordinator.predict_stream(world.ids, PredictOptions(skip_unknown_ids=True), chunk_size=5)
    )
    assert len(chunks) == -(-len(world.ids) // 5)
    assert sorted(i for c in chunks for i in c.unpredicted_sample_ids) == sorted(only_b)
    assert all(audio(c).sites[1].error for c in chunks)
    # The sync reports the site as the modality's error; the other modality is fine.
    errors = coordinator.sync()
    assert SITE_B in errors["audio"] and errors["image"] == ""
    # Prometheus: the modality is not up (a site is down), per site which one.
    metrics = ServiceMetrics("coordinator")
    watch_coordinator(metrics, coordinator)
    scraped = metrics.registry.get_sample_value
    assert scraped("jacfusion_owner_up", {"modality": "audio"}) == 0.0
    assert scraped("jacfusion_owner_up", {"modality": "image"}) == 1.0
    for site, up in ((SITE_A, 1.0), (SITE_B, 0.0)):
        assert scraped("jacfusion_owner_site_up", {"modality": "audio", "site": site}) == up


def test_every_site_down_fails_the_modality_naming_each(world: World) -> None:
    coordinator, _ = world.split(
        **{SITE_A.replace(".", "_"): down_stub(), SITE_B.replace(".", "_"): down_stub()}
    )
    got = coordinator.predict(world.ids, PredictOptions(skip_unknown_ids=True))
    contribution = audio(got)
    assert contribution.error.startswith("UNAVAILABLE: all 2 sites of 'audio' failed")
    assert [s.target for s in contribution.sites] == [SITE_A, SITE_B]
    assert all(s.error.startswith("UNAVAILABLE: ") for s in contribution.sites)
    assert not contribution.used_mask.any()
    with pytest.raises(PredictError) as err:
        coordinator.predict(world.ids, PredictOptions(require_all=True))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_site_with_another_model_version_is_never_fused(world: World) -> None:
    rng = np.random.default_rng(11)
    w = rng.normal(size=(len(world.sites[SITE_B].gram), 6))
    moved = replace(world.sites[SITE_B], version="f" * 16, gram=w @ w.T)
    coordinator, stubs = world.split(**{SITE_B.replace(".", "_"): H.good_stub(moved)})
    errors = coordinator.sync()
    assert "model version mismatch" in errors["audio"] and SITE_B in errors["audio"]
    registered = coordinator.head("audio")
    assert registered is not None and registered.version == world.sites[SITE_A].version
    got = coordinator.predict(world.ids, PredictOptions(skip_unknown_ids=True))
    a_ids = world.site_ids[SITE_A]
    reference = world.reference(world.counts[SITE_A])  # b's patients are not counted
    np.testing.assert_allclose(rows(got, a_ids), rows(reference, a_ids), rtol=0, atol=1e-12)
    _a, b_site = audio(got).sites
    assert b_site.error.startswith("FAILED_PRECONDITION: ") and moved.version in b_site.error
    assert b_site.samples == 0 and b_site.model_version == moved.version
    # Its head was never fetched, and the registered version did not flip.
    assert stubs[SITE_B].served_heads == []
    still = coordinator.head("audio")
    assert still is not None and still.version == registered.version
    # GetModelInfo reports each site's version and the mismatch.
    context: Any = None  # GetModelInfo reads nothing of its context
    info = FusionServicer(coordinator).GetModelInfo(fusion_pb2.GetModelInfoRequest(), context)
    entry = next(m for m in info.modalities if m.modality == "audio")
    assert [s.target for s in entry.sites] == [SITE_A, SITE_B]
    assert entry.sites[1].model_version == moved.version and entry.sites[1].error
    assert entry.sites[0].error == ""
    image = next(m for m in info.modalities if m.modality == "image")
    assert len(image.sites) == 0
    shown = info_payload(info)["modalities"]  # coordinator info --json
    assert [s["target"] for s in shown[0]["sites"]] == [SITE_A, SITE_B] and "sites" not in shown[1]


def test_version_choice_keeps_the_registered_version() -> None:
    assert pick_version(["v2", "v1"], "v1") == "v1"
    assert pick_version(["v2", "v1", "v1"], None) == "v1"
    assert pick_version(["v2", "v1"], None) == "v2"  # tie: the earliest site
    assert pick_version(["v3", "v2", "v2"], "v1") == "v2"


def test_pseudonym_on_two_sites_is_reported_per_sample(world: World) -> None:
    held_b = world.site_ids[SITE_B]
    with_image = next(i for i in held_b if i in world.whole["image"].logits)
    audio_only = next(i for i in held_b if i not in world.whole["image"].logits)
    both = dict(world.sites[SITE_A].logits)
    both.update({i: world.whole["audio"].logits[i] + 1.0 for i in (with_image, audio_only)})
    stub_a = H.good_stub(replace(world.sites[SITE_A], logits=both))
    coordinator, _ = world.split(**{SITE_A.replace(".", "_"): stub_a})
    with pytest.raises(PredictError) as err:
        coordinator.predict(world.ids)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert audio_only in err.value.message and "more than one site" in err.value.message
    got = coordinator.predict(world.ids, PredictOptions(skip_unknown_ids=True))
    assert got.unpredicted_sample_ids == [audio_only]
    assert sorted(audio(got).ambiguous_sample_ids) == sorted([with_image, audio_only])
    # The id image holds too is predicted from image alone (no site's audio logits picked).
    i = got.sample_ids.index(with_image)
    assert not audio(got).used[i]
    image_only = world.reference(modalities=("image",), ids=[with_image])
    np.testing.assert_allclose(got.probabilities[i], image_only.probabilities[0], atol=1e-12)
    # Everything else is as with one owner.
    others = [s for s in got.sample_ids if s != with_image]
    np.testing.assert_allclose(
        rows(got, others), rows(world.reference(), others), rtol=0, atol=1e-12
    )
    decoded = answer_from_proto(predictions_to_proto(got))
    assert sorted(decoded.modalities[0].ambiguous_sample_ids) == sorted([with_image, audio_only])
    wire = answer_from_proto(predictions_to_proto(got))  # predict --json names them too
    assert "ambiguous_sample_ids" in wire.to_json([])["modalities"][0]


# --- configuration: --owner lists and sites files ----------------------------------------------


def test_parse_owners_and_sites_file(tmp_path: Path) -> None:
    got = parse_owners(["audio=h1:1,h2:1", "image=h3:2"])
    assert [(e.modality, e.target) for e in got] == [
        ("audio", "h1:1"),
        ("audio", "h2:1"),
        ("image", "h3:2"),
    ]
    path = tmp_path / "sites.json"
    path.write_text(json.dumps({"audio": ["h1:1", "h2:1"], "image": "h3:2"}))
    assert load_sites(path) == got
    for bad, what in [
        (["audio=h1:1,h1:1"], "listed twice"),
        (["audio=h1:1,"], "empty address"),
        (["audio"], "MODALITY=HOST:PORT"),
        (["audio=h1"], "host:port"),
    ]:
        with pytest.raises(ValueError, match=what):
            parse_owners(bad)
    for text, what in [("[]", "JSON object"), ('{"audio": []}', "non-empty list"), ("{", "JSON")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=what):
            load_sites(path)


def test_coordinator_refuses_a_site_twice(tmp_path: Path) -> None:
    stub = down_stub()
    with pytest.raises(ValueError, match="lists a site twice"):
        Coordinator(
            tmp_path / "r",
            [OwnerEndpoint("audio", "h:1"), OwnerEndpoint("audio", "h:1")],
            INSECURE,
            CONFIG,
            connect=lambda e: OwnerChannel(stub),
        )


def test_serve_takes_owner_or_sites_not_both(tmp_path: Path) -> None:
    sites = tmp_path / "sites.json"
    sites.write_text(json.dumps({"audio": ["h1:1", "h1:1"]}))
    runner = CliRunner()
    base = ["coordinator", "serve", "--registry", str(tmp_path / "r"), "--insecure", "--port", "0"]
    both = runner.invoke(app, [*base, "--owner", "audio=h:1", "--sites", str(sites)])
    assert both.exit_code != 0 and "either --owner" in both.output
    neither = runner.invoke(app, base)
    assert neither.exit_code != 0 and "either --owner" in neither.output
    twice = runner.invoke(app, [*base, "--sites", str(sites)])
    assert twice.exit_code != 0 and "listed twice" in twice.output
