"""The Prometheus endpoint, scraped over real HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tvm
from modules import unary_module
from prometheus_client.parser import text_string_to_metric_families

from tvmpipe.orchestrator import PipelineModule, PipelineModuleConfig, build_pipeline
from tvmpipe.orchestrator.library import PipelineLibrary

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def lib() -> Iterator[PipelineLibrary]:
    first, second = unary_module("negative"), unary_module("negative")
    cfg = PipelineModuleConfig()
    cfg.inputs["x"] = (first, "data_0")
    cfg.connect(first, 0, second, "data_0")
    cfg.outputs.append((second, 0))
    with tvm.transform.PassContext(opt_level=3):
        built = build_pipeline(cfg)
    yield built
    built.close()


def _scrape(address: str) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    with urllib.request.urlopen(address, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value, family.type))
    return samples


def test_metrics_are_served_per_stage_and_for_the_pipeline(lib: PipelineLibrary) -> None:
    with PipelineModule(lib, metrics_port=0) as pipe:
        assert pipe.metrics_address is not None
        assert pipe.metrics_address.startswith("http://127.0.0.1:")
        x = np.ones((1, 4), "float32")
        for future in [pipe.submit({"x": x}) for _ in range(5)]:
            np.testing.assert_allclose(future.result(30)[0], x)
        samples = _scrape(pipe.metrics_address)
        address = pipe.metrics_address
    inputs = {s[0]["stage"]: s[1] for s in samples["tvmpipe_stage_inputs_total"]}
    assert inputs == {"mod1": 5.0, "mod2": 5.0}
    labels = samples["tvmpipe_stage_inputs_total"][0][0]
    assert labels["device"] == "cpu" and labels["worker"]
    assert all(s[2] == "counter" for s in samples["tvmpipe_stage_inputs_total"])
    service = {s[0]["stage"]: s[1] for s in samples["tvmpipe_stage_service_seconds_count"]}
    assert service == {"mod1": 5.0, "mod2": 5.0}
    inf = [s for s in samples["tvmpipe_stage_service_seconds_bucket"] if s[0]["le"] == "+Inf"]
    assert all(s[1] == 5.0 for s in inf)
    assert samples["tvmpipe_latency_seconds_count"][0][1] == 5.0
    assert samples["tvmpipe_latency_seconds_sum"][0][1] > 0
    assert samples["tvmpipe_in_flight"][0][1] == 0.0
    assert "tvmpipe_restarts" in samples and "tvmpipe_stage_received_bytes_total" in samples
    with pytest.raises(OSError):  # closed with the pipeline
        urllib.request.urlopen(address, timeout=2)


def test_no_endpoint_unless_asked(lib: PipelineLibrary) -> None:
    with PipelineModule(lib) as pipe:
        assert pipe.metrics_address is None
