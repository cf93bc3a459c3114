"""The built-in templates and custom workflows, checked against the recorded object_info
(trace 03) and accepted by the fake, which validates like a real ComfyUI."""

from __future__ import annotations

import json

import pytest

from core.comfy.client import ComfyClient
from core.comfy.workflows import (
    GenerationParams,
    LoraSpec,
    apply_param_map,
    build_img2img,
    build_txt2img,
    build_workflow,
    load_api_workflow,
    make_param_map,
    param_map_problems,
    required_models,
    validate_against_object_info,
    workflow_seed,
)
from core.errors import ValidationFailed
from tests.fakecomfy import FakeComfy, facts
from tests.fakecomfy.replay import trace_prompt_bodies

MODEL = "tiny-random-sd15.safetensors"
RECORDED_INFO = facts.object_info_entries()


def params(**overrides: object) -> GenerationParams:
    base = {"prompt": "a photo of a cat", "negative": "blurry, low quality", "model": MODEL,
            "width": 128, "height": 128, "steps": 10, "cfg": 7.0, "seed": 42}
    return GenerationParams(**{**base, **overrides})  # type: ignore[arg-type]


def test_txt2img_is_the_recorded_graph() -> None:
    recorded = trace_prompt_bodies("10_ksampler_progress_legacy_previews")[0]["prompt"]
    built = build_txt2img(params(filename_prefix="trace_ks_2e14c1"))
    recorded["3"]["inputs"]["seed"] = 42
    assert built == recorded
    assert validate_against_object_info(built, RECORDED_INFO) == []
    assert workflow_seed(built) == 42


def test_random_seed_is_resolved() -> None:
    seed = workflow_seed(build_txt2img(params(seed=None)))
    assert isinstance(seed, int) and seed >= 0


def test_lora_sits_between_checkpoint_and_consumers() -> None:
    wf = build_workflow(params(loras=(LoraSpec("a.safetensors", 0.8),
                                      LoraSpec("b.safetensors", 0.5, 0.2))))
    assert wf["20"]["inputs"]["model"] == ["4", 0] and wf["20"]["inputs"]["clip"] == ["4", 1]
    assert wf["21"]["inputs"]["model"] == ["20", 0]
    assert wf["21"]["inputs"]["strength_clip"] == 0.2
    assert wf["20"]["inputs"]["strength_clip"] == 0.8
    assert wf["3"]["inputs"]["model"] == ["21", 0]
    assert wf["6"]["inputs"]["clip"] == wf["7"]["inputs"]["clip"] == ["21", 1]
    info = json.loads(json.dumps(RECORDED_INFO))
    info["LoraLoader"]["input"]["required"]["lora_name"][0] = ["a.safetensors", "b.safetensors"]
    assert validate_against_object_info(wf, info) == []
    assert required_models(wf) == {"checkpoints": {MODEL}, "loras": {"a.safetensors",
                                                                     "b.safetensors"}}


def test_img2img_uses_load_image_and_vae_encode() -> None:
    wf = build_img2img(params(denoise=0.4), "discord/in.png")
    assert wf["10"] == {"class_type": "LoadImage", "inputs": {"image": "discord/in.png"}}
    assert wf["11"]["inputs"] == {"pixels": ["10", 0], "vae": ["4", 2]}
    assert wf["3"]["inputs"]["latent_image"] == ["11", 0]
    assert wf["3"]["inputs"]["denoise"] == 0.4
    assert "5" not in wf


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"width": 100}, "Width must be a multiple of 8"), ({"steps": 0}, "Steps"),
     ({"prompt": " "}, "prompt"), ({"cfg": 101.0}, "CFG"), ({"seed": -1}, "seed"),
     ({"denoise": 1.5}, "Denoise"), ({"loras": (LoraSpec("x", 200.0),)}, "LoRA strength"),
     ({"filename_prefix": "../x"}, "prefix")],
)
def test_params_are_validated(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationFailed, match=message):
        build_workflow(params(**overrides))


@pytest.mark.parametrize("variant", ["txt2img", "lora", "img2img", "batch"])
async def test_templates_run_on_the_fake(
    client: ComfyClient, fake: FakeComfy, variant: str
) -> None:
    fake.models["loras"] = ["style.safetensors"]
    if variant == "img2img":
        upload = await client.upload_image(fake.files["input"]["example.png"], "in.png")
        wf = build_img2img(params(steps=2), upload.load_image_value)
    elif variant == "lora":
        wf = build_workflow(params(steps=2, loras=(LoraSpec("style.safetensors", 0.7),)))
    else:
        wf = build_workflow(params(steps=2, batch=2 if variant == "batch" else 1))
    assert validate_against_object_info(wf, await client.object_info()) == []
    queued = await client.queue_prompt(wf)
    assert not queued.partial
    await fake.wait_idle()
    outputs = await client.get_prompt_outputs(queued.prompt_id)
    assert len(outputs) == (2 if variant == "batch" else 1)


def test_object_info_problems() -> None:
    wf = build_workflow(params())
    wf["3"]["inputs"]["sampler"] = "euler"  # a typo'd input name
    wf["4"]["inputs"]["ckpt_name"] = "other.safetensors"
    wf["8"]["inputs"]["samples"] = ["99", 0]
    wf["6"]["inputs"]["clip"] = ["4", 0]
    del wf["5"]["inputs"]["width"]
    wf["12"] = {"class_type": "NoSuchNode", "inputs": {}}
    problems = validate_against_object_info(wf, RECORDED_INFO)
    assert problems == [
        "node 4 (CheckpointLoaderSimple): ckpt_name 'other.safetensors' is not in the list of "
        "available values",
        "node 6 (CLIPTextEncode): input 'clip' expects CLIP but node 4 gives MODEL",
        "node 5 (EmptyLatentImage): required input 'width' is missing",
        "node 3 (KSampler): unknown input 'sampler'",
        "node 8 (VAEDecode): input 'samples' links to missing node 99",
        "node 12: unknown node type 'NoSuchNode'",
    ]
    assert validate_against_object_info({"1": {"class_type": "EmptyImage", "inputs": {
        "width": 8, "height": 8, "batch_size": 1, "color": 0}}}, RECORDED_INFO) == [
        "the workflow has no output node (e.g. SaveImage)"]


async def test_custom_workflow_param_map(client: ComfyClient, fake: FakeComfy) -> None:
    custom = load_api_workflow(json.dumps(trace_prompt_bodies("06_prompt_success_simple")[0]))
    pmap = make_param_map([("size", ["1", "width"]), ("size", ["1", "height"]),
                           ("color", ["1", "color"]), ("prefix", ["3", "filename_prefix"])])
    assert param_map_problems(custom, pmap) == []
    wf = apply_param_map(custom, pmap, {"size": 32, "color": 255, "prefix": "custom"})
    assert wf["1"]["inputs"] == {"width": 32, "height": 32, "batch_size": 1, "color": 255}
    assert custom["1"]["inputs"]["width"] == 64  # the original is untouched
    assert validate_against_object_info(wf, await client.object_info()) == []
    queued = await client.queue_prompt(wf)
    await fake.wait_idle()
    names = sorted(o.filename for o in await client.get_prompt_outputs(queued.prompt_id))
    assert names[1] == "custom_00001_.png"
    assert fake.prompts[queued.prompt_id]["1"]["inputs"]["width"] == 32


def test_param_map_errors() -> None:
    custom = trace_prompt_bodies("06_prompt_success_simple")[0]["prompt"]
    bad = {"w": [("1", "widht")], "img": [("2", "image")], "n": [("77", "x")]}
    assert param_map_problems(custom, bad) == [
        "parameter 'w': node 1 (EmptyImage) has no input 'widht'",
        "parameter 'img': input 'image' of node 2 is a link",
        "parameter 'n': node 77 does not exist",
    ]
    with pytest.raises(ValidationFailed, match="no parameter named 'seed'"):
        apply_param_map(custom, {}, {"seed": 1})
    with pytest.raises(ValidationFailed, match="broken"):
        apply_param_map(custom, bad, {"w": 1})


def test_load_api_workflow_rejects_ui_format() -> None:
    with pytest.raises(ValidationFailed, match="Save \\(API Format\\)"):
        load_api_workflow(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(ValidationFailed, match="not valid JSON"):
        load_api_workflow("{")
    with pytest.raises(ValidationFailed, match="no class_type"):
        load_api_workflow(json.dumps({"1": {"inputs": {}}}))
