"""`sdrt serve` against the real A1111 client (webuiapi, PyPI) on a live uvicorn server on loopback.

The reference is sdrt's own Python API on the same tiny export: the image the server returns must equal,
pixel for pixel, what ``pipe.txt2img/img2img/inpaint`` gives for the parameters A1111's fields map to
(pipelines themselves are held to diffusers in tests/pipelines/test_parity.py).
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image, ImageDraw

import sdrt

webuiapi = pytest.importorskip("webuiapi")
uvicorn = pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")
from sdrt.server import Limits, ServerOptions, create_app  # noqa: E402

SIZE, STEPS, PROMPT, NEGATIVE = 64, 3, "a red fox in the snow", "blurry"
LONG = 150                                # steps of a job that is still running when the test acts on it
ERROR_KEYS = {"error", "detail", "body", "errors"}


@contextmanager
def running(app):
    """Serve ``app`` on a free loopback port in a thread; yields the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def pipes(tiny_export, tiny_inpaint_export):
    """Reference pipelines, loaded apart from the server's."""
    return {folder: sdrt.load(folder, runtime="onnxruntime", progress=False)
            for folder in (tiny_export, tiny_inpaint_export)}


def load(folder):
    return sdrt.load(folder, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def port(tiny_export, tiny_inpaint_export):
    options = ServerOptions(folders=(tiny_export, tiny_inpaint_export), runtime="onnxruntime")
    with running(create_app(options, load)) as port:
        yield port


@pytest.fixture(scope="module")
def api(port):
    return webuiapi.WebUIApi(port=port, sampler="Euler a", steps=STEPS)


def url(port, route):
    return f"http://127.0.0.1:{port}/sdapi/v1/{route}"


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.int16) for im in images])


def b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def init_image():
    x = np.linspace(0, 255, SIZE, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(x, (SIZE, 1)), np.tile(x[:, None], (1, SIZE)),
                                     np.full((SIZE, SIZE), 90, np.uint8)], axis=-1))


@pytest.fixture(scope="module")
def mask():
    m = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(m).rectangle((16, 16, 47, 47), fill=255)
    return m


def in_background(fn, *args, **kwargs):
    pool = ThreadPoolExecutor(1)
    return pool.submit(fn, *args, **kwargs)


def wait_for(predicate, timeout=30.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_txt2img_equals_the_python_api(api, pipes, tiny_export):
    # A1111 >= 1.9: "DPM++ 2M" + scheduler "automatic" is DPM++ 2M with Karras sigmas; n_iter batches get seed+i
    r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1234, n_iter=2, width=SIZE, height=SIZE,
                    steps=STEPS, cfg_scale=6.0, sampler_name="DPM++ 2M", scheduler="automatic",
                    override_settings={"CLIP_stop_at_last_layers": 2})
    refs = [pipes[tiny_export].txt2img(PROMPT, negative_prompt=NEGATIVE, seed=s, width=SIZE, height=SIZE,
                                       steps=STEPS, guidance_scale=6.0, sampler="DPM++ 2M Karras", clip_skip=2)
            for s in (1234, 1235)]
    assert r.info["all_seeds"] == [1234, 1235]
    assert np.array_equal(pixels(r.images), pixels([ref.images[0] for ref in refs]))
    assert r.info["infotexts"] == [ref.infotexts[0] for ref in refs]
    assert [im.info["parameters"] for im in r.images] == r.info["infotexts"]     # the PNG carries it
    assert "Clip skip: 2" in r.info["infotexts"][0] and r.info["clip_skip"] == 2
    assert r.parameters["prompt"] == PROMPT and r.parameters["n_iter"] == 2


def test_hires_fix_equals_the_python_api(api, pipes, tiny_export):
    r = api.txt2img(prompt=PROMPT, seed=5, width=SIZE, height=SIZE, steps=2, sampler_name="Euler",
                    enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2,
                    denoising_strength=0.6)
    ref = pipes[tiny_export].txt2img(PROMPT, seed=5, width=SIZE, height=SIZE, steps=2, guidance_scale=7.0,
                                     sampler="Euler", hires=sdrt.pipelines.pipeline.Hires(
                                         scale=1.5, upscaler="Latent", steps=2, strength=0.6))
    assert r.images[0].size == (96, 96)
    assert np.array_equal(pixels(r.images), pixels(ref.images))


def test_img2img_equals_the_python_api(api, pipes, tiny_export, init_image):
    r = api.img2img(images=[init_image], prompt=PROMPT, seed=7, width=SIZE, height=SIZE, steps=4,
                    denoising_strength=0.6, sampler_name="Euler a", cfg_scale=7.5)
    ref = pipes[tiny_export].img2img(init_image, PROMPT, strength=0.6, seed=7, steps=4, sampler="Euler a")
    assert np.array_equal(pixels(r.images), pixels(ref.images))
    assert r.parameters["init_images"] is None                  # include_init_images false, as A1111


def test_inpaint_on_another_checkpoint(api, pipes, tiny_inpaint_export, init_image, mask):
    # per-request checkpoint switch to the 9-channel export; "Whole picture", fill "original", no blur:
    # the model's image inside the mask, the original pixels outside (A1111's overlay)
    title = next(m["title"] for m in api.get_sd_models() if m["filename"] == str(tiny_inpaint_export))
    r = api.img2img(images=[init_image], mask_image=mask, prompt=PROMPT, seed=9, width=SIZE, height=SIZE,
                    steps=4, denoising_strength=1.0, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                    override_settings={"sd_model_checkpoint": title})
    ref = pipes[tiny_inpaint_export].inpaint(init_image, mask, PROMPT, strength=1.0, seed=9, steps=4,
                                             sampler="Euler a", guidance_scale=7.0)
    expected = Image.composite(ref.images[0], init_image, mask)
    assert np.array_equal(pixels(r.images), pixels([expected]))
    assert r.info["sd_model_name"] == title.split(" [")[0] and r.info["is_using_inpainting_conditioning"]
    assert api.get_options()["sd_model_checkpoint"] != title     # restored afterwards (the default)


def test_only_masked_inpainting_fields_reach_the_pipeline(api, pipes, tiny_export, init_image):
    # "Only masked" with padding, blur and latent noise on a larger picture than the processing size
    big = init_image.resize((96, 80))
    m = Image.new("L", big.size, 0)
    ImageDraw.Draw(m).rectangle((50, 30, 69, 49), fill=255)
    r = api.img2img(images=[big], mask_image=m, prompt=PROMPT, seed=4, width=SIZE, height=SIZE, steps=3,
                    denoising_strength=0.7, mask_blur=3, inpainting_fill=2, inpaint_full_res=True,
                    inpaint_full_res_padding=5, sampler_name="Euler", cfg_scale=7.5)
    ref = pipes[tiny_export].inpaint(big, m, PROMPT, strength=0.7, seed=4, steps=3, sampler="Euler", width=SIZE,
                                     height=SIZE, mask_blur=3, fill="latent noise", only_masked=True, padding=5)
    assert r.images[0].size == (96, 80)
    assert np.array_equal(pixels(r.images), pixels(ref.images))
    assert r.info["infotexts"] == ref.infotexts and "Masked content: latent noise" in ref.infotexts[0]


def test_whole_picture_inpainting_fields_reach_the_pipeline(api, pipes, tiny_export, init_image, mask):
    # "Whole picture", crop and resize, inverted mask, latent nothing: the pipeline's image shown through the
    # doubled blurred mask over the resized original (A1111's overlay)
    big = init_image.resize((96, 80))
    m = mask.resize((96, 80))
    r = api.img2img(images=[big], mask_image=m, prompt=PROMPT, seed=6, width=SIZE, height=SIZE, steps=3,
                    denoising_strength=0.6, mask_blur=2, inpainting_fill=3, inpaint_full_res=False,
                    inpainting_mask_invert=1, resize_mode=1, sampler_name="Euler", cfg_scale=7.5)
    ref = pipes[tiny_export].inpaint(big, m, PROMPT, strength=0.6, seed=6, steps=3, sampler="Euler", width=SIZE,
                                     height=SIZE, mask_blur=2, fill=3, invert_mask=True, resize_mode=1)
    cover = sdrt.pipelines.masking.prepare(m, 2, invert=True)
    cover = sdrt.pipelines.images.resize_image(cover, 1, SIZE, SIZE)
    doubled = np.clip(np.asarray(cover, np.float32) * 2, 0, 255).astype(np.uint8)
    base = sdrt.pipelines.images.resize_image(big, 1, SIZE, SIZE)
    expected = sdrt.pipelines.masking.paste(ref.images[0], base, Image.fromarray(doubled))
    assert np.array_equal(pixels(r.images), pixels([expected]))
    assert "Mask mode: Inpaint not masked" in r.info["infotexts"][0]


def test_img2img_latent_upscale(api, pipes, tiny_export, init_image):
    big = init_image.resize((96, 80))
    r = api.img2img(images=[big], prompt=PROMPT, seed=7, width=SIZE, height=SIZE, steps=3, resize_mode=3,
                    denoising_strength=0.6, sampler_name="Euler", cfg_scale=7.5)
    ref = pipes[tiny_export].img2img(big, PROMPT, strength=0.6, seed=7, steps=3, sampler="Euler", width=SIZE,
                                     height=SIZE, resize_mode=3)
    assert np.array_equal(pixels(r.images), pixels(ref.images))


def test_options_switch_the_checkpoint(api, port, init_image, mask):
    models = api.get_sd_models()
    first, second = models[0]["title"], models[1]["title"]
    assert api.get_options()["sd_model_checkpoint"] == first
    api.set_options({"sd_model_checkpoint": second, "CLIP_stop_at_last_layers": 2})
    options = api.get_options()
    assert options["sd_model_checkpoint"] == second and options["CLIP_stop_at_last_layers"] == 2
    assert options["sd_checkpoint_hash"] == models[1]["sha256"]
    r = api.img2img(images=[init_image], mask_image=mask, inpaint_full_res=False, prompt=PROMPT, seed=1,
                    width=SIZE, height=SIZE, steps=2)
    assert r.info["sd_model_hash"] == models[1]["hash"] and r.info["clip_skip"] == 2
    everything_masked = requests.post(url(port, "txt2img"), json={"width": SIZE, "height": SIZE, "steps": 1})
    assert everything_masked.status_code == 200 and len(everything_masked.json()["images"]) == 1
    bad = requests.post(url(port, "options"), json={"sd_model_checkpoint": "no-such-model"})
    assert bad.status_code == 422 and set(bad.json()) == ERROR_KEYS and "no-such-model" in bad.json()["detail"]
    api.set_options({"sd_model_checkpoint": first, "CLIP_stop_at_last_layers": 1})
    assert api.util_get_current_model() == first


def test_listings(api, port):
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"] == {"scheduler": "karras"}
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "uniform", "karras", "sgm_uniform"]
    assert len(api.get_sd_models()) == 2 and api.get_sd_vae() == []
    assert {"Lanczos", "Nearest"} <= {u["name"] for u in api.get_upscalers()}
    assert {"Latent", "Latent (nearest-exact)"} <= {u["name"] for u in api.get_latent_upscale_modes()}
    scripts = {"x/y/z plot", "prompt matrix", "prompts from file or textbox", "controlnet"}
    assert {task: set(names) for task, names in api.get_scripts().items()} == {"txt2img": scripts, "img2img": scripts}
    assert api.get_loras() == [] and api.get_embeddings()["loaded"] == {}
    assert api.get_memory()["ram"]["total"] > 0 and api.get_cmd_flags()["listen"] is False
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["current_task"] is None and idle["current_image"] is None
    info = {(s["name"], s["is_img2img"]): s for s in requests.get(url(port, "script-info")).json()}
    assert len(info) == 8 and info["x/y/z plot", False]["args"][0]["label"] == "x_type"
    assert info["controlnet", True]["is_alwayson"]
    r = requests.get(url(port, "samplers"))
    assert float(r.headers["X-Process-Time"]) >= 0


def test_png_info_reads_the_infotext(api):
    r = api.txt2img(prompt="a (cat:1.2), photo", seed=3, width=SIZE, height=SIZE, steps=2)
    info = api.png_info(r.images[0])
    assert info.info == r.info["infotexts"][0]
    assert info.json["parameters"]["Prompt"] == "a (cat:1.2), photo" and info.json["parameters"]["Seed"] == "3"


def test_progress_and_interrupt(api, port):
    job = in_background(api.txt2img, prompt=PROMPT, seed=1, width=SIZE, height=SIZE, steps=LONG)
    wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 1)
    progress = api.get_progress()
    assert 0 < progress["progress"] < 1 and progress["eta_relative"] > 0
    assert progress["state"]["sampling_steps"] == LONG and progress["state"]["job"] == "txt2img"
    task = requests.post(f"http://127.0.0.1:{port}/internal/progress", json={"id_task": progress["current_task"]})
    assert task.json()["active"] is True
    api.interrupt()
    r = job.result(timeout=30)
    assert r.images == [] and r.info["all_seeds"] == []          # stopped before its first image was done
    assert api.get_progress()["current_task"] is None


def test_sixteen_concurrent_clients(port, pipes, tiny_export):
    def one(seed):
        client = webuiapi.WebUIApi(port=port)
        return client.txt2img(prompt=PROMPT, seed=seed, width=SIZE, height=SIZE, steps=2, sampler_name="Euler")
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(100, 116)))
    refs = pipes[tiny_export].txt2img(PROMPT, seed=100, batch_size=1, width=SIZE, height=SIZE, steps=2,
                                      sampler="Euler", guidance_scale=7.0)
    assert np.array_equal(pixels(results[0].images), pixels(refs.images))
    for seed, r in zip(range(100, 116), results):
        ref = pipes[tiny_export].txt2img(PROMPT, seed=seed, width=SIZE, height=SIZE, steps=2, sampler="Euler",
                                         guidance_scale=7.0)
        assert r.info["all_seeds"] == [seed] and np.array_equal(pixels(r.images), pixels(ref.images))


@pytest.mark.parametrize("payload, route, status, words", [
    ({"init_images": ["not base64 !!"]}, "img2img", 422, "base64"),
    ({"init_images": [base64.b64encode(b"plain text").decode()]}, "img2img", 422, "not a readable image"),
    ({"init_images": []}, "img2img", 404, "Init image not found"),
    ({"sampler_name": "Restart"}, "txt2img", 404, "Sampler not found"),
    ({"scheduler": "exponential"}, "txt2img", 422, "Exponential"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, "txt2img", 422, "nope"),
    ({"script_name": "no such script"}, "txt2img", 422, "script 'no such script' not found"),
    ({"alwayson_scripts": {"adetailer": {"args": []}}}, "txt2img", 422, "always on script"),
    ({"width": "wide"}, "txt2img", 422, "width"),
    ({"width": 60}, "txt2img", 422, "multiples of 8"),
    ({"steps": 151}, "txt2img", 422, "steps"),
    ({"batch_size": 8, "n_iter": 3}, "txt2img", 422, "batch_size*n_iter"),
    ({"subseed_strength": 0.5}, "txt2img", 422, "subseed_strength"),
    ({"tiling": True}, "txt2img", 422, "tiling"),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "txt2img", 422, "upscaler"),
    ({"init_images": [b64(Image.new("RGB", (SIZE, SIZE)))], "width": -64}, "img2img", 422, "positive"),
    ({"init_images": [b64(Image.new("RGB", (SIZE, SIZE)))], "mask": b64(Image.new("L", (SIZE, SIZE), 255)),
      "inpaint_full_res": False, "mask_blur_x": 10 ** 9}, "img2img", 422, "mask_blur"),
    ("not json {", "txt2img", 422, "JSON decode error"),
    (b"\xff\xfe\x00", "txt2img", 400, "parsing the body"),
])
def test_bad_input_gets_a1111_errors(port, payload, route, status, words):
    if isinstance(payload, (str, bytes)):  # not JSON at all
        r = requests.post(url(port, route), data=payload, headers={"Content-Type": "application/json"})
    else:
        r = requests.post(url(port, route), json={"width": SIZE, "height": SIZE, "steps": 2, **payload})
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == ERROR_KEYS and words in body["detail"] + body["errors"]
    assert "X-Process-Time" in r.headers


def test_bad_mask_size_and_server_keeps_serving(api, port, init_image):
    small = b64(Image.new("L", (32, 32), 255))
    r = requests.post(url(port, "img2img"), json={"init_images": [b64(init_image)], "mask": small, "width": SIZE,
                                                  "height": SIZE, "steps": 2, "inpaint_full_res": False})
    assert r.status_code == 422 and "mask is 32x32" in r.json()["detail"]
    assert len(api.txt2img(prompt=PROMPT, seed=1, width=SIZE, height=SIZE, steps=1).images) == 1


def test_out_of_memory_is_a_422_and_the_server_keeps_serving(tiny_export, monkeypatch):
    """A request too large for the machine (the backend's allocation fails) is the client's to shrink."""
    from sdrt.runtimes.base import Timed
    from sdrt.specs import SPECS

    class Exhausted:
        spec = SPECS["unet"]

        def run(self, feeds):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for 256 GB")
    with pytest.raises(MemoryError, match="unet: .*Failed to allocate"):
        Timed(Exhausted()).run({})
    pipe = load(tiny_export)
    original, calls = pipe.txt2img, iter([MemoryError("unet: Failed to allocate memory")])

    def txt2img(*args, **kwargs):
        if (error := next(calls, None)) is not None:
            raise error
        return original(*args, **kwargs)
    monkeypatch.setattr(pipe, "txt2img", txt2img)
    options = ServerOptions(folders=(tiny_export,), runtime="onnxruntime")
    with running(create_app(options, lambda folder: pipe)) as port:
        r = requests.post(url(port, "txt2img"), json={"width": SIZE, "height": SIZE, "steps": 1})
        assert r.status_code == 422 and set(r.json()) == ERROR_KEYS
        assert "more memory than the server has" in r.json()["detail"]
        assert requests.post(url(port, "txt2img"), json={"width": SIZE, "height": SIZE, "steps": 1}).ok


def test_disconnected_client_does_not_wedge_the_queue(api, port):
    body = json.dumps({"prompt": PROMPT, "width": SIZE, "height": SIZE, "steps": LONG}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: api.get_progress()["state"]["sampling_step"] > 0)
    began = time.time()
    r = api.txt2img(prompt=PROMPT, seed=1, width=SIZE, height=SIZE, steps=1)
    assert len(r.images) == 1
    assert time.time() - began < 10          # the abandoned job was stopped, not run to its end


@pytest.fixture(scope="module")
def small_server(tiny_export):
    """Queue of one, Basic auth, a 20 kB body limit."""
    options = ServerOptions(folders=(tiny_export,), runtime="onnxruntime", queue_size=1,
                            auth=(("alice", "s3cret"), ("bob", "pw")), limits=Limits(max_body_bytes=20_000))
    with running(create_app(options, load)) as port:
        yield port


def test_auth(small_server):
    assert requests.get(url(small_server, "options")).status_code == 401
    wrong = requests.get(url(small_server, "options"), auth=("alice", "nope"))
    assert wrong.status_code == 401 and set(wrong.json()) == ERROR_KEYS
    assert requests.get(url(small_server, "options"), auth=("bob", "pw")).status_code == 200
    client = webuiapi.WebUIApi(port=small_server, username="alice", password="s3cret")
    assert client.get_sd_models()[0]["model_name"] == "sdrt"


def test_full_queue_answers_503_and_body_limit(small_server):
    auth = ("alice", "s3cret")
    client = webuiapi.WebUIApi(port=small_server, username=auth[0], password=auth[1])
    running_job = in_background(client.txt2img, prompt=PROMPT, width=SIZE, height=SIZE, steps=LONG)
    wait_for(lambda: client.get_progress()["state"]["sampling_step"] > 0)
    waiting = in_background(client.txt2img, prompt=PROMPT, seed=2, width=SIZE, height=SIZE, steps=1)
    wait_for(lambda: client.get_progress()["state"]["queued"] == 1)
    over = requests.post(url(small_server, "txt2img"), auth=auth, json={"width": SIZE, "height": SIZE, "steps": 1})
    assert over.status_code == 503 and over.headers["Retry-After"] and set(over.json()) == ERROR_KEYS
    client.interrupt()
    assert running_job.result(timeout=30).images == []
    assert len(waiting.result(timeout=30).images) == 1             # the queued one was served
    big = requests.post(url(small_server, "txt2img"), auth=auth, json={"prompt": "x" * 30_000})
    assert big.status_code == 422 and "20000 bytes" in big.json()["detail"]
