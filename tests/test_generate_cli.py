"""`python -m bot generate` as a user runs it: a subprocess against the fake ComfyUI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.fakecomfy import FakeComfy

ROOT = Path(__file__).resolve().parent.parent


async def run_cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMFYVAST_CONFIG": str(tmp_path / "no.toml")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "generate",
        *args,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_generate_writes_the_images(tmp_path: Path) -> None:
    comfy = FakeComfy(
        models={"checkpoints": ["a.safetensors"]}, output_size=(48, 32), step_delay=0.01
    )
    await comfy.start()
    try:
        code, out, err = await run_cli(
            tmp_path,
            "--comfy-url",
            comfy.url,
            "a red cube",
            "--param",
            "steps=6",
            "--param",
            "seed=99",
            "--param",
            "batch=2",
            "--out",
            str(tmp_path / "out"),
        )
        assert code == 0, err
        paths = [Path(line) for line in out.split()]
        assert len(paths) == 2
        produced = set(comfy.files["output"].values())
        assert all(p.read_bytes() in produced for p in paths)
        assert "6/6 100%" in err and "seed 99" in err
        [workflow] = comfy.prompts.values()
        assert workflow["3"]["inputs"]["seed"] == 99
    finally:
        await comfy.stop()


async def test_custom_workflow_file_with_node_params(tmp_path: Path) -> None:
    from core.comfy.workflows import GenerationParams, build_workflow

    comfy = FakeComfy(models={"checkpoints": ["a.safetensors"]}, output_size=(16, 16))
    await comfy.start()
    try:
        wf = build_workflow(GenerationParams(prompt="x", model="a.safetensors", steps=2, seed=1))
        path = tmp_path / "wf.json"
        path.write_text(json.dumps(wf))
        code, out, err = await run_cli(
            tmp_path,
            "--comfy-url",
            comfy.url,
            "from a file",
            "--workflow",
            str(path),
            "--param",
            "3.steps=3",
            "--param",
            "seed=5",
            "--out",
            str(tmp_path),
        )
        assert code == 0, err
        [sent] = comfy.prompts.values()
        assert sent["6"]["inputs"]["text"] == "from a file"
        assert (sent["3"]["inputs"]["steps"], sent["3"]["inputs"]["seed"]) == (3, 5)
    finally:
        await comfy.stop()


async def test_failure_exits_nonzero_with_the_sentence(tmp_path: Path) -> None:
    comfy = FakeComfy(models={"checkpoints": ["a.safetensors"]})
    await comfy.start()
    try:
        code, _, err = await run_cli(
            tmp_path, "--comfy-url", comfy.url, "x", "--param", "model=missing.safetensors"
        )
        assert code == 1
        assert "node 4 (CheckpointLoaderSimple)" in err and "Traceback" not in err
        code, _, err = await run_cli(tmp_path, "--comfy-url", "http://127.0.0.1:9", "x")
        assert code == 1 and "Traceback" not in err
    finally:
        await comfy.stop()
