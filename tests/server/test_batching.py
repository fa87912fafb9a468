"""`sdrt serve --batch-requests` and live previews, through the real `webuiapi` client on loopback.

References: a batched request's images and infotexts must equal what sdrt's Python API gives for that
request alone (the Python API is held to diffusers in tests/pipelines); a preview must equal A1111's
rendering of the step's latents: "Full" the VAE decode (at Euler's last step: the final image), "Approx
cheap" A1111's linear map (modules/sd_vae_approx.py ``cheap_approximation``) written out here again.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

import sdrt

webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")
from sdrt.server import ServerOptions, batching, convert, create_app, preview  # noqa: E402
from sdrt.server import options as opts  # noqa: E402
from sdrt.server.checkpoints import read  # noqa: E402
from sdrt.server.jobs import Job  # noqa: E402
from sdrt.server.schemas import Txt2Img  # noqa: E402

from .test_server import LONG, PROMPT, SIZE, in_background, pixels, running, url, wait_for  # noqa: E402

STEPS, ROWS = 3, 4
# A1111 modules/sd_vae_approx.py cheap_approximation, SD 1.x: rows are latent channels, columns R, G, B
A1111_CHEAP = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return sdrt.load(tiny_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def unet_batches() -> list[int]:
    return []


@pytest.fixture(scope="module")
def port(tiny_export, unet_batches):
    """A server batching up to 4 images; its UNet records the batch size of every call."""
    def load(folder):
        loaded = sdrt.load(folder, runtime="onnxruntime", progress=False)
        run = loaded.models.unet.run

        def recorded(feeds):
            unet_batches.append(len(feeds["sample"]))
            return run(feeds)
        loaded.models.unet.run = recorded
        return loaded
    options = ServerOptions(folders=(tiny_export,), runtime="onnxruntime", batch_requests=ROWS)
    with running(create_app(options, load)) as port:
        yield port


def queued_behind_a_long_job(port, requests_kwargs: list[dict]) -> list:
    """Queue the requests (in this order) while a long job runs, then interrupt it: they wait together."""
    client = webuiapi.WebUIApi(port=port)
    blocker = in_background(client.txt2img, prompt=PROMPT, width=SIZE, height=SIZE, steps=LONG)
    wait_for(lambda: client.get_progress()["state"]["sampling_step"] > 0)
    jobs = []
    for n, kwargs in enumerate(requests_kwargs, 1):
        jobs.append(in_background(webuiapi.WebUIApi(port=port).txt2img, width=SIZE, height=SIZE, steps=STEPS,
                                  sampler_name="Euler a", **kwargs))
        wait_for(lambda: client.get_progress()["state"]["queued"] == n)
    client.interrupt()
    assert blocker.result(timeout=60).images == []
    return [job.result(timeout=120) for job in jobs]


def alone(pipe, prompt, negative_prompt="", seed=0, batch_size=1, cfg_scale=7.0):
    return pipe.txt2img(prompt, negative_prompt=negative_prompt, seed=seed, batch_size=batch_size, width=SIZE,
                        height=SIZE, steps=STEPS, sampler="Euler a", guidance_scale=cfg_scale)


def test_compatible_requests_share_one_unet_batch(port, pipe, unet_batches):
    asked = [dict(prompt="a red fox in the snow", seed=10),
             dict(prompt="a blue car, (shiny:1.2)", negative_prompt="ugly", seed=20, batch_size=2),
             dict(prompt="a red fox in the snow", seed=40, cfg_scale=5.0),        # another CFG: not batched
             dict(prompt="a house [on a hill:by the sea:0.5]", negative_prompt="blurry", seed=30)]
    results = queued_behind_a_long_job(port, asked)
    for kwargs, r in zip(asked, results):
        ref = alone(pipe, **kwargs)
        assert r.info["all_seeds"] == ref.seeds and r.info["infotexts"] == ref.infotexts
        assert np.abs(pixels(r.images) - pixels(ref.images)).max() <= 1          # within 1/255
        assert r.info["all_prompts"] == [kwargs["prompt"]] * len(ref.images)
    # rows 1+2+1 of the three compatible requests, [uncond; cond] each: one UNet call of 8 per step
    assert unet_batches.count(2 * ROWS) == STEPS


def test_rows_that_cannot_share_a_batch_run_one_by_one(port, pipe, unet_batches):
    long_prompt = ", ".join(["a very detailed painting of a fox"] * 12)           # two 75-token chunks
    asked = [dict(prompt="a red fox", seed=1), dict(prompt=long_prompt, seed=2)]
    unet_batches.clear()
    results = queued_behind_a_long_job(port, asked)
    for kwargs, r in zip(asked, results):
        assert np.abs(pixels(r.images) - pixels(alone(pipe, **kwargs).images)).max() <= 1
    assert 4 not in unet_batches                                                   # never batched together


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data.partition(",")[2] or data)))


def test_live_preview_in_progress(port):
    client = webuiapi.WebUIApi(port=port)
    for kind, size in (("Approx cheap", SIZE // 8), ("Full", SIZE)):
        job = in_background(client.txt2img, prompt=PROMPT, width=SIZE, height=SIZE, steps=LONG,
                            override_settings={"show_progress_type": kind, "show_progress_every_n_steps": 2})
        wait_for(lambda: client.get_progress()["current_image"] is not None)
        progress = client.get_progress()
        assert decode(progress["current_image"]).size == (size, size)
        assert requests.get(url(port, "progress"), params={"skip_current_image": "true"}).json()["current_image"] is None
        task = requests.post(f"http://127.0.0.1:{port}/internal/progress",
                             json={"id_task": progress["current_task"], "live_preview": True}).json()
        assert task["id_live_preview"] >= 0 and decode(task["live_preview"]).size == (size, size)
        client.interrupt()
        job.result(timeout=60)
    bad = requests.post(url(port, "options"), json={"show_progress_type": "Approx NN"})
    assert bad.status_code == 422 and "show_progress_type" in bad.json()["detail"]


def a1111_cheap(latents: np.ndarray) -> np.ndarray:
    """A1111's Approx cheap, channel by channel: (4, h, w) -> (h, w, 3) uint8."""
    rgb = sum(latents[channel][..., None] * np.array(A1111_CHEAP[channel]) for channel in range(4))
    return (np.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)


def test_preview_renders_as_a1111(pipe, tiny_export):
    checkpoint = read(tiny_export)
    req = Txt2Img(prompt=PROMPT, seed=3, width=SIZE, height=SIZE, steps=STEPS, sampler_name="Euler")
    steps_latents: list[np.ndarray] = []
    pipe.txt2img(PROMPT, seed=3, width=SIZE, height=SIZE, steps=STEPS, sampler="Euler", guidance_scale=7.0,
                 preview=steps_latents.append)
    for kind in ("Full", "Approx cheap"):
        settings = {**opts.DEFAULTS, "show_progress_type": kind, "show_progress_every_n_steps": -1}
        job = Job(lambda job: None, preview=preview.renderer(settings, lambda: pipe), preview_every=-1)
        out = convert.run(convert.txt2img(req, settings, checkpoint), pipe, job)
        assert job.id_live_preview == 0                      # -1: rendered once, at the last step
        shown = np.asarray(job.current_image, dtype=np.int16)
        if kind == "Full":     # Euler's last step lands on its denoised latents: the preview is the image
            assert np.abs(shown - pixels(out.images)[0]).max() <= 1
        else:
            assert np.abs(shown - a1111_cheap(steps_latents[-1][0])).max() <= 1


def test_pipeline_refuses_rows_it_cannot_batch(pipe):
    small = dict(width=SIZE, height=SIZE, steps=1)
    cases = [(dict(prompt=["a", "b"], batch_size=3), "batch_size (3)"),
             (dict(prompt=["a <lora:grain:1>", "b"]), "<lora:...> tags"),
             (dict(prompt=["a", ", ".join(["a very detailed painting of a fox"] * 12)]), "75-token chunks"),
             (dict(prompt=["a", "b AND c"]), "AND sub-prompts")]
    for kwargs, words in cases:
        with pytest.raises(sdrt.errors.InvalidRequest, match=words.replace("(", r"\(").replace(")", r"\)")):
            pipe.txt2img(kwargs.pop("prompt"), **kwargs, **small)


def test_a_stopped_request_leaves_its_batch(pipe, tiny_export):
    # /interrupt of one request (its client left) answers it at once with no images; the rest of the batch
    # goes on and gets what it would alone; when every request is stopped, the batch stops
    checkpoint = read(tiny_export)
    settings = {**opts.DEFAULTS, "sd_model_checkpoint": checkpoint.title}

    def batch():
        gens = [convert.txt2img(Txt2Img(prompt=prompt, seed=seed, width=SIZE, height=SIZE, steps=STEPS,
                                        sampler_name="Euler a"), settings, checkpoint)
                for prompt, seed in (("a red fox", 5), ("a house", 6))]
        return [Job(lambda job: None, batchable=batching.batchable(gen, lambda c: pipe, None)) for gen in gens]
    jobs = batch()
    assert jobs[0].batchable.key == jobs[1].batchable.key
    jobs[0].interrupted.set()
    answers = jobs[0].batchable.run(jobs)
    assert answers[0] is None and json.loads(jobs[0].future.result()["info"])["all_seeds"] == []
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in answers[1]["images"]]
    assert np.abs(pixels(images) - pixels(alone(pipe, "a house", seed=6).images)).max() <= 1
    jobs = batch()
    for job in jobs:
        job.interrupted.set()
    assert jobs[0].batchable.run(jobs) == [None, None] and all(job.future.done() for job in jobs)
