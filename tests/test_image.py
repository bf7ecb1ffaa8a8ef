"""The CPU container image (Dockerfile), for real: built with podman, started, and asked for chat
completions (text and a grammar-constrained tool call) through the official ``openai`` client.

Slow (a cold build downloads about 1 GB; a warm one reuses the dependency layers) and skipped without
podman + buildah. The build gets this machine's pip setup the way the Dockerfile documents for anyone:
the index, timeout and CA bundle as build secrets (never in a layer), a local folder of wheels as the
``wheels`` build context, torch pinned as constraints.txt pins it. ``podman build --isolation chroot``
and ``buildah run --isolation chroot`` because sandboxes like these machines refuse the default OCI
runtime; on a normal machine ``podman run``/``docker run`` does the same thing.

Set ``AETHERIS_IMAGE_BASE`` for a base image other than python:3.11-slim-bookworm (docs/SERVING.md
shows how to make one with debootstrap where no registry can be reached).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import tiny_checkpoint

pytestmark = pytest.mark.slow

from conftest import ROOT
TAG = "localhost/aetheris-test:cpu"
KEY = "sk-image-test"
TOOL = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"lang": {"enum": ["sw", "th", "am"]}}, "required": ["lang"]}}}


def _tools_or_skip() -> None:
    for tool in ("podman", "buildah"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (apt-get install podman buildah)")


def _pip_config() -> dict[str, str]:
    """``pip config list`` as {key: value} (``global.index-url`` and ``:env:.find-links`` both -> the bare key)."""
    out = subprocess.run(["python", "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    config = {}
    for line in out.splitlines():
        m = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line.strip())
        if m:
            config[m.group(1)] = m.group(2)
    for key in ("index-url", "extra-index-url", "find-links", "cert"):  # pip's own environment variables win
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            config[key] = value
    return config


def build_flags(tmp: Path) -> list[str]:
    """podman build options that hand this machine's package sources to the build without baking them in."""
    config = _pip_config()
    conf = ["[global]", f"index-url = {config.get('index-url', 'https://pypi.org/simple')}"]
    remote = [u for u in config.get("extra-index-url", "").split() if u.startswith(("http://", "https://"))]
    if remote:
        conf.append("extra-index-url = " + " ".join(remote))
    if "default-timeout" in config or "timeout" in config:
        conf.append(f"timeout = {config.get('timeout', config.get('default-timeout'))}")
    flags = []
    cert = config.get("cert")
    if cert and Path(cert).is_file():
        conf.append("cert = /run/secrets/pip-cert")
        flags += ["--secret", f"id=pip-cert,src={cert}"]
    (tmp / "pip.conf").write_text("\n".join(conf) + "\n")
    flags += ["--secret", f"id=pip.conf,src={tmp / 'pip.conf'}"]
    wheels = [Path(d) for d in config.get("find-links", "").split() if Path(d).is_dir()]
    torch_pin = re.search(r"^torch==\S+", (ROOT / "constraints.txt").read_text(), flags=re.M)
    if wheels:
        flags += ["--build-context", f"wheels={wheels[0]}"]
        if any(wheels[0].glob("torch-*.whl")):
            flags += ["--build-arg", "TORCH_INDEX_URL="]  # torch from the local wheels, not the CPU index
    if torch_pin:
        flags += ["--build-arg", f"TORCH_SPEC={torch_pin.group(0)}"]
    if os.environ.get("AETHERIS_IMAGE_BASE"):
        flags += ["--build-arg", f"BASE={os.environ['AETHERIS_IMAGE_BASE']}"]
    return flags


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str, timeout: float = 120) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    _tools_or_skip()
    base = os.environ.get("AETHERIS_IMAGE_BASE", "python:3.11-slim-bookworm")
    if subprocess.run(["podman", "image", "exists", base]).returncode != 0:
        try:
            pulled = subprocess.run(["podman", "pull", "-q", base], capture_output=True, timeout=120).returncode == 0
        except subprocess.TimeoutExpired:
            pulled = False
        if not pulled:
            pytest.skip(f"base image {base} is neither local nor pullable here; build one (docs/SERVING.md, "
                        "'Building without registry access') and set AETHERIS_IMAGE_BASE")
    tmp = tmp_path_factory.mktemp("image")
    _run("podman", "build", "--isolation", "chroot", *build_flags(tmp), "-f", str(ROOT / "Dockerfile"),
         "-t", TAG, str(ROOT), timeout=1800)
    return TAG


def test_cpu_image_serves_chat_completions(image, tiny_tokenizer, tmp_path):
    config = json.loads(_run("podman", "image", "inspect", image))[0]["Config"]
    assert config["User"] == "aetheris"
    model = tiny_checkpoint(tiny_tokenizer, tmp_path / "tiny")
    # The container user (uid 10001) reads the mounted checkpoint: it must be world-readable.
    for path in [model, *model.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    container = _run("buildah", "from", image).strip()
    server = None
    try:
        # Nothing of the build's pip setup is in the image.
        _run("buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c",
             "test \"$(id -u)\" = 10001 && test ! -e /etc/pip.conf && test ! -e /run/secrets/pip-cert "
             "&& test ! -e /wheels && ! python3 -c 'import triton' 2>/dev/null")
        history = _run("podman", "history", "--no-trunc", image)
        assert "index-url = " not in history and "BEGIN CERTIFICATE" not in history  # the secrets' contents
        port = _free_port()
        # The image's own entrypoint (as `docker run` would start it), with extra `serve` arguments.
        entry = config["Entrypoint"]
        server = subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--env", f"PORT={port}",
                                   "-v", f"{model}:/model:ro", container, "--", *entry, "--api-key", KEY],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the server exited:\n{server.stdout.read()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server in the image never became healthy"
            time.sleep(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["model"]  # named after the mounted folder
        reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Habari?"}],
                                               max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
        call = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Pick one"}],
                                              tools=[TOOL], tool_choice="required", max_tokens=256)
        assert json.loads(call.choices[0].message.tool_calls[0].function.arguments)["lang"] in ("sw", "th", "am")
        assert "Aetheris playground" in httpx.get(url + "/").text
        assert httpx.get(url + "/v1/models").status_code == 401  # --api-key reached the server
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        subprocess.run(["buildah", "rm", container], capture_output=True)
