"""`sdrt serve --ray`: the A1111 app as two Ray Serve replicas on a local Ray cluster, behind Ray's proxy.

As in test_server.py, the reference is sdrt's Python API on the same tiny export (held to diffusers in
tests/pipelines/test_parity.py) and the client is the real ``webuiapi``; what is new here is Ray: requests
through its HTTP proxy reach both replicas, and settings changed through one replica hold on the other.
"""
from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import sdrt

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")
from sdrt.server import ServerOptions  # noqa: E402
from sdrt.server.ray_serve import NAMESPACE, RayOptions, application, settings_store  # noqa: E402

SIZE, STEPS, PROMPT = 64, 3, "a red fox in the snow"
CONCURRENT = 6
LONG = 150                                # steps of a job still running when the test acts on it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def port(tiny_export):
    """Two replicas of the tiny export on an in-process Ray cluster; shut down after the module."""
    ray.init(num_cpus=2, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        scale = RayOptions(replicas=2, cpus_per_replica=1, name="sdrt-test")
        options = ServerOptions(folders=(tiny_export,), runtime="onnxruntime", threads=1)
        serve.run(application(options, scale, settings_store(scale.name)), name=scale.name, route_prefix="/")
        yield port
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return sdrt.load(tiny_export, runtime="onnxruntime", threads=1, progress=False)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def txt2img(port: int, seed: int) -> tuple[Image.Image, str]:
    r = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", timeout=120, json={
        "prompt": PROMPT, "seed": seed, "width": SIZE, "height": SIZE, "steps": STEPS, "sampler_name": "Euler a"})
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))), r.headers["x-sdrt-replica"]


def test_concurrent_requests_spread_over_replicas(port, pipe):
    seeds = range(100, 100 + CONCURRENT)
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(lambda seed: txt2img(port, seed), seeds))
    for seed, (image, _) in zip(seeds, answers):
        ref = pipe.txt2img(PROMPT, seed=seed, width=SIZE, height=SIZE, steps=STEPS, sampler="Euler a",
                           guidance_scale=7.0)                   # A1111's cfg_scale default
        assert np.abs(pixels(image) - pixels(ref.images[0])).max() <= 1, seed
    assert len({replica for _, replica in answers}) == 2


def test_options_hold_on_every_replica(port, pipe):
    api = webuiapi.WebUIApi(port=port, sampler="Euler a", steps=STEPS)
    api.set_options({"CLIP_stop_at_last_layers": 2})
    seen = {}
    for _ in range(20):                     # idle replicas: the proxy picks at random, so both answer
        r = requests.get(f"http://127.0.0.1:{port}/sdapi/v1/options", timeout=30)
        seen.setdefault(r.headers["x-sdrt-replica"], set()).add(r.json()["CLIP_stop_at_last_layers"])
    assert len(seen) == 2 and all(values == {2} for values in seen.values())
    with ThreadPoolExecutor(2) as pool:     # generations on either replica use the new clip skip
        results = list(pool.map(lambda seed: api.txt2img(prompt=PROMPT, seed=seed, width=SIZE, height=SIZE,
                                                         steps=STEPS), (7, 8)))
    for seed, r in zip((7, 8), results):
        ref = pipe.txt2img(PROMPT, seed=seed, width=SIZE, height=SIZE, steps=STEPS, sampler="Euler a",
                           guidance_scale=7.0, clip_skip=2)
        assert np.abs(pixels(r.images[0]) - pixels(ref.images[0])).max() <= 1
        assert "Clip skip: 2" in r.info["infotexts"][0]


def test_progress_and_interrupt_reach_the_busy_replica(port):
    # the proxy sends these to the replica with fewer requests, the idle one: it must still see the running job
    api = webuiapi.WebUIApi(port=port)
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(requests.post, f"http://127.0.0.1:{port}/sdapi/v1/txt2img", timeout=60, json={
            "prompt": PROMPT, "seed": 1, "width": SIZE, "height": SIZE, "steps": LONG})
        for _ in range(300):
            progress = api.get_progress()
            if progress["state"]["sampling_step"] > 1:
                break
            time.sleep(0.05)
        assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == LONG
        tasks = [requests.post(f"http://127.0.0.1:{port}/internal/progress", timeout=30,
                               json={"id_task": progress["current_task"]}) for _ in range(8)]
        assert all(t.json()["active"] for t in tasks)
        api.interrupt()
        r = job.result(timeout=30)
    assert r.status_code == 200 and r.json()["images"] == []     # stopped before its first image was done
    busy = r.headers["x-sdrt-replica"]
    assert any(t.headers["x-sdrt-replica"] != busy for t in tasks)
    assert api.get_progress()["current_task"] is None


@pytest.mark.parametrize("flags, error", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--ray", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2"], "not both"),
    (["--ray", "--min-replicas", "1"], "give both --min-replicas and --max-replicas"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "need 0 <= --min-replicas <= --max-replicas"),
])
def test_cli_refuses_bad_scale_flags_before_starting_ray(tiny_export, capsys, monkeypatch, flags, error):
    from sdrt.cli import main
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))
    assert main(["serve", str(tiny_export), *flags]) == 2
    assert error in capsys.readouterr().err
