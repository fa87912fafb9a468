"""ControlNet units, /controlnet routes and A1111's scripts (X/Y/Z plot, Prompt matrix, Prompts from file or
textbox) on a live server, against the tiny ControlNet export.

References: sdrt's Python API on the same export (held to diffusers in tests/pipelines), OpenCV's Canny for
the canny preprocessor, and A1111's own rules written out here (cell order ix + iy*nx, combination i of the
prompt matrix takes the parts whose bit is set in i, a textbox line's prompt before the request's).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

import sdrt
from sdrt import manifest as mf

from .test_server import ERROR_KEYS, PROMPT, SIZE, b64, load, pixels, running, url

webuiapi = pytest.importorskip("webuiapi")
requests = pytest.importorskip("requests")
cv2 = pytest.importorskip("cv2")
from sdrt.server import ServerOptions, create_app  # noqa: E402

STEPS = 2


@pytest.fixture(scope="module")
def port(control_export, tiny_inpaint_export):
    options = ServerOptions(folders=(control_export, tiny_inpaint_export), runtime="onnxruntime")
    with running(create_app(options, load)) as port:
        yield port


@pytest.fixture(scope="module")
def api(port):
    return webuiapi.WebUIApi(port=port, sampler="Euler a", steps=STEPS)


@pytest.fixture(scope="module")
def pipe(control_export):
    return sdrt.load(control_export, runtime="onnxruntime", progress=False)


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))       # 64x64, sharp edges


def ref(pipe, prompt=PROMPT, seed=1, steps=STEPS, **kwargs):
    kwargs = {"negative_prompt": "", "guidance_scale": 7.0, "sampler": "Euler a", **kwargs}
    return pipe.txt2img(prompt, seed=seed, width=SIZE, height=SIZE, steps=steps, **kwargs)


def post(port, **payload):
    body = {"prompt": PROMPT, "width": SIZE, "height": SIZE, "steps": STEPS, "sampler_name": "Euler a", **payload}
    r = requests.post(url(port, "txt2img"), json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    return [unb64(image) for image in out["images"]], json.loads(out["info"])


def unb64(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_controlnet_units_equal_the_python_api(api, pipe, photo):
    # unit 0: a map as is, named as an A1111 client names a model ("..._canny [hash]" -> the export's "canny");
    # unit 1: the canny preprocessor at processor_res 64 (= the image size: cv2.Canny on the image itself);
    # unit 2: disabled, skipped
    units = [webuiapi.ControlNetUnit(image=photo, module="none", model="control_v11p_sd15_canny [d14c016b]",
                                     weight=0.8, guidance_end=0.6, control_mode=1, resize_mode="Just Resize"),
             webuiapi.ControlNetUnit(image=photo, module="canny", model="depth", processor_res=64,
                                     threshold_a=50, threshold_b=150, resize_mode="Crop and Resize"),
             webuiapi.ControlNetUnit(image=photo, model="depth", enabled=False)]
    # a fresh alwayson_scripts: webuiapi writes the units into its mutable default dict otherwise, and every
    # later txt2img call of the process would send them again
    r = api.txt2img(prompt=PROMPT, seed=21, width=SIZE, height=SIZE, steps=STEPS, cfg_scale=7.0,
                    controlnet_units=units, alwayson_scripts={})
    controls = [sdrt.Control(image=photo, model="canny", scale=0.8, end=0.6, resize_mode="Just Resize",
                             control_mode="My prompt is more important"),
                sdrt.Control(image=photo, model="depth", preprocessor="canny", low_threshold=50, high_threshold=150)]
    expected = ref(pipe, seed=21, control=controls)
    assert len(r.images) == 3                                   # the image, then the two detected maps
    assert np.array_equal(pixels(r.images[:1]), pixels(expected.images))
    edges = cv2.Canny(np.asarray(photo), 50, 150)
    assert np.array_equal(pixels(r.images[1:]), pixels([photo, Image.fromarray(edges)]))
    assert np.abs(pixels(expected.images) - pixels([ref(pipe, seed=21).images[0]])).max() > 0   # control acts
    text = r.info["infotexts"][0]
    assert '"Module: none, Model: canny, Weight: 0.8' in text and "ControlNet 1" in text and "ControlNet 2" not in text


def test_controlnet_routes(api, port, control_export, photo):
    assert api.controlnet_version() == 2
    folder = mf.read(control_export, verify=False)
    digests = {name: hashlib.sha256((control_export / c.file).read_bytes()).hexdigest()[:8]
               for name, c in folder.controlnets.items()}
    assert api.controlnet_model_list() == [f"{name} [{digests[name]}]" for name in ("canny", "depth")]
    modules = api.controlnet_module_list()
    assert modules == ["none", "canny"]
    detected = api.controlnet_detect([photo], module="canny", processor_res=64, threshold_a=50, threshold_b=150)
    assert np.array_equal(np.asarray(detected.images[0]), cv2.Canny(np.asarray(photo), 50, 150))
    scaled = requests.post(f"http://127.0.0.1:{port}/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [b64(photo)], "controlnet_processor_res": 128})
    assert unb64(scaled.json()["images"][0]).size == (128, 128)      # processor_res is the short side
    bad = requests.post(f"http://127.0.0.1:{port}/controlnet/detect",
                        json={"controlnet_module": "openpose", "controlnet_input_images": [b64(photo)]})
    assert bad.status_code == 422 and set(bad.json()) == ERROR_KEYS and "Module not available" in bad.json()["detail"]


@pytest.mark.parametrize("unit, words", [
    ({"model": "lineart"}, "model(lineart) not found"),
    ({"model": "None"}, "no ControlNet model selected"),
    ({"model": "canny", "module": "openpose"}, "module(openpose) not found"),
    ({"model": "canny", "weight": 3}, "weight"),
    ({"model": "canny", "image": "@@@"}, "base64"),
])
def test_bad_controlnet_units_get_422(port, photo, unit, words):
    unit = {"enabled": True, "module": "none", "image": b64(photo), **unit}
    r = requests.post(url(port, "txt2img"), json={"width": SIZE, "height": SIZE, "steps": 1,
                                                  "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 422 and set(r.json()) == ERROR_KEYS and words in r.json()["detail"], r.text


def xyz_args(x_type, x_values, y_type, y_values, x_dropdown=(), y_dropdown=(), legend=False, lone=True):
    return [x_type, x_values, list(x_dropdown), y_type, y_values, list(y_dropdown), 0, "", [],
            legend, lone, False, False, False, False, False, 0, False]


def test_xyz_plot_seed_by_steps(port, pipe):
    images, info = post(port, script_name="X/Y/Z plot", script_args=xyz_args(1, "11, 12", 4, "2-3"))
    cells = [ref(pipe, seed=seed, steps=steps).images[0] for steps in (2, 3) for seed in (11, 12)]  # ix + iy*nx
    grid, lone = images[0], images[1:]
    assert grid.size == (2 * SIZE, 2 * SIZE) and len(lone) == 4
    assert np.array_equal(pixels(lone), pixels(cells))
    assert np.array_equal(pixels([grid.crop((SIZE, SIZE, 2 * SIZE, 2 * SIZE))]), pixels(cells[3:]))
    assert info["all_seeds"] == [11, 12, 11, 12] and info["index_of_first_image"] == 1
    assert info["infotexts"][1:] == [ref(pipe, seed=s, steps=n).infotexts[0] for n in (2, 3) for s in (11, 12)]
    assert info["infotexts"][0].endswith(
        ', Script: X/Y/Z plot, X Type: Seed, X Values: "11, 12", Fixed X Values: "11, 12", Y Type: Steps, '
        'Y Values: 2-3')


def test_xyz_plot_sampler_by_checkpoint_with_legend(port, pipe, tiny_inpaint_export, api):
    titles = [m["title"] for m in api.get_sd_models()]
    images, info = post(port, seed=4, script_name="x/y/z plot", script_args=xyz_args(
        "Sampler", "", "Checkpoint name", "", x_dropdown=["Euler", "DDIM"], y_dropdown=titles, legend=True,
        lone=False))
    assert len(images) == 1
    grid = images[0]
    assert grid.width > 2 * SIZE and grid.height > 2 * SIZE               # the legend bands, left and top
    other = sdrt.load(tiny_inpaint_export, runtime="onnxruntime", progress=False)
    cells = [ref(p, seed=4, sampler=s).images[0] for p in (pipe, other) for s in ("Euler", "DDIM")]
    corner = grid.crop((grid.width - SIZE, grid.height - SIZE, grid.width, grid.height))
    assert np.array_equal(pixels([corner]), pixels(cells[3:]))
    assert len(info["infotexts"]) == 5 and info["all_seeds"] == [4] * 4
    assert "Y Type: Checkpoint name" in info["infotexts"][0]


def test_prompt_matrix(port, pipe):
    images, info = post(port, prompt="a fox|in snow|at night", seed=8, script_name="Prompt matrix",
                        script_args=[False, False, "positive", "comma", 0])
    prompts = ["a fox", "a fox, in snow", "a fox, at night", "a fox, in snow, at night"]
    cells = [ref(pipe, prompt=p, seed=8).images[0] for p in prompts]
    grid, lone = images[0], images[1:]
    assert np.array_equal(pixels(lone), pixels(cells))
    assert grid.width == 2 * SIZE + SIZE * 3 // 4 and grid.height > 2 * SIZE     # 2 x 2 and the label bands
    corner = grid.crop((grid.width - SIZE, grid.height - SIZE, grid.width, grid.height))
    assert np.array_equal(pixels([corner]), pixels(cells[3:]))
    assert info["all_prompts"] == prompts and info["all_seeds"] == [8] * 4
    assert [t.split("\n")[0] for t in info["infotexts"]] == prompts[:1] + prompts


def test_prompts_from_textbox(port, pipe):
    lines = "a red fox\n\n--prompt \"a cat\" on a mat --steps 3 --seed 5\n--negative_prompt blurry --cfg_scale 4"
    images, info = post(port, prompt="photo", seed=100, script_name="Prompts from file or textbox",
                        script_args=[True, False, "start", lines])
    expected = [ref(pipe, prompt="a red fox photo", seed=100),
                ref(pipe, prompt="a cat on a mat photo", seed=5, steps=3),
                ref(pipe, prompt="photo", seed=102, negative_prompt="blurry", guidance_scale=4.0)]
    assert np.array_equal(pixels(images), pixels([e.images[0] for e in expected]))
    assert info["all_seeds"] == [100, 5, 102] and info["infotexts"] == [e.infotexts[0] for e in expected]


@pytest.mark.parametrize("payload, words", [
    ({"script_name": "Loopback"}, "script 'Loopback' not found"),
    ({"script_name": "X/Y/Z plot", "script_args": [2, "1,2"]}, "'Var. seed'"),
    ({"script_name": "X/Y/Z plot", "script_args": [1, "a, b"]}, "not all ints"),
    ({"script_name": "X/Y/Z plot", "script_args": [7, "dog, cat"]}, "Prompt S/R did not find 'dog'"),
    ({"script_name": "X/Y/Z plot", "script_args": [4, "149-151"]}, "steps is 151"),
    ({"script_name": "X/Y/Z plot", "script_args": [1, "1-1000000000"]}, "up to 10000 values"),
    ({"script_name": "Prompt matrix", "prompt": "a" + "|b" * 60}, "more than 16 images"),
    ({"script_name": "Prompts from file or textbox", "script_args": [False, False, "start", "--bogus 1"]},
     "--bogus"),
])
def test_bad_scripts_get_422(port, payload, words):
    r = requests.post(url(port, "txt2img"), json={"width": SIZE, "height": SIZE, "steps": 1, **payload})
    assert r.status_code == 422 and set(r.json()) == ERROR_KEYS and words in r.json()["detail"], r.text
