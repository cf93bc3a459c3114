"""Each fake Vast.ai instance as a container seen from the inside: a real SSH server and
the image's file system, boot scripts and services.

Every modelled behaviour names its source (vast.md is /work/shared/reference/vast.md):

- Vast runs only ``onstart`` with the SSH launch modes, never the image's entrypoint, and
  runs it again on every start (vast.md section 7; vast-ai/docs
  api-reference/creating-instances-with-api.mdx). :meth:`ContainerHost.boot` does exactly
  that, on create and after every start or reboot.
- A stopped container's processes are gone (vast.md section 7 "Restarts"):
  :meth:`ContainerHost.halt` kills every process of the instance, and SSH refuses until the
  next boot. The disk (``/workspace``, ``/root``, ``/opt``) stays until destroy.
- The container sees Vast's variables (``CONTAINER_ID``, ``CONTAINER_API_KEY``) and the
  create's ``env``; SSH sessions do not (that is why images append to /etc/environment,
  vast.md section 5 "Env vars are not visible in SSH sessions").
- ``vastai/comfy``: ComfyUI in ``/opt/workspace-internal/ComfyUI`` (comfyui/Dockerfile); the
  image's ``entrypoint.sh`` copies it to ``$WORKSPACE/ComfyUI`` (boot script
  36-sync-workspace.sh) and starts supervisord, whose ``comfyui`` program runs ``python
  main.py $COMFYUI_ARGS`` (port 18188 by default) only when PORTAL_CONFIG names ComfyUI
  (supervisor-scripts/comfyui.sh, utils/exit_portal.sh); supervisorctl reports it.
  vast-ai/base-image at a7552d1, derivatives/pytorch/derivatives/comfyui.
- Plain CUDA images (``pytorch/pytorch:*-runtime``) have python3 but no ``curl`` and no
  ``git`` on PATH (vast.md section 7 "Plain CUDA images"), and no ``entrypoint.sh``.

How: the instance's directories are bind-mounted onto ``/workspace``,
``/opt/workspace-internal``, ``/root/.ssh`` and ``/root/.comfyvast`` inside a mount
namespace of its own (``unshare -m``, private propagation, so nothing shows on the host);
every SSH session and the onstart enter it with ``nsenter``. ComfyUI is the fake ComfyUI
(tests/fakecomfy) in a process of its own. The network is the host's: ComfyUI listens on
the host's 127.0.0.1:18188, so one ComfyUI image instance runs at a time. Needs root
(``available()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from tests.sshserver.asyncssh_server import _copy_out, _feed_stdin

if TYPE_CHECKING:
    from tests.fakevast.server import FakeInstance, FakeVast

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Mount points inside each instance; created empty on the host when missing. Not all of
# /root: the test interpreter may live there (pyenv). /root/.ssh and /root/.comfyvast are
# where the onstart writes; the rest of the home directory is the host's.
MOUNTS = ("/workspace", "/opt/workspace-internal", "/root/.comfyvast", "/root/.ssh")
# Not on a plain CUDA image's PATH (vast.md section 7).
PLAIN_MISSING = frozenset({"curl", "git", "wget"})
HOST_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
COMFY_MODELS = {
    "checkpoints": ["sd15.safetensors", "sdxl.safetensors"],
    "loras": ["detail.safetensors"],
    "upscale_models": ["4x-ultra.pth"],
}
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def is_comfy_image(image: str) -> bool:
    # Vast publishes its ComfyUI image as vastai/comfy (DockerHub repo "comfy",
    # .github/workflows/build-comfyui.yml DEFAULT_DOCKERHUB_REPO).
    return image.split(":", 1)[0].lower().startswith("vastai/comfy")


def available() -> str | None:
    """None when containers can run here, else why not."""
    if os.geteuid() != 0:
        return "fake containers need root (mount namespaces)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"fake containers need {tool}"
    return None


# The stub every fake image's ComfyUI main.py is: it runs the fake ComfyUI (tests/fakecomfy)
# with the test interpreter, so ComfyUI's arguments reach it as on a real server.
MAIN_PY = """\
# A stand-in ComfyUI main.py: runs tests/fakecomfy with the test interpreter.
import os
import sys

os.environ["PYTHONPATH"] = {repo!r}
os.execv({python!r}, [{python!r}, "-m", "tests.fakevast.container", "comfy", *sys.argv[1:]])
"""


@dataclass
class Container:
    inst_id: int
    image: str
    base: Path
    host_key: asyncssh.SSHKey
    env: dict[str, str]
    comfy: bool
    acceptor: asyncssh.SSHAcceptor | None = None
    port: int = 0
    holder: asyncio.subprocess.Process | None = None
    namespace: str | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    booting: asyncio.Task[None] | None = None
    conns: set[asyncssh.SSHServerConnection] = field(default_factory=set)
    procs: dict[asyncio.subprocess.Process, asyncio.Task[int]] = field(default_factory=dict)
    boots: int = 0
    onstart_runs: int = 0

    def path(self, inside: str) -> Path:
        """The host path of ``inside`` (one of the mounted directories)."""
        for mount in MOUNTS:
            if inside == mount or inside.startswith(mount + "/"):
                rest = inside[len(mount):].lstrip("/")
                return self.base / mount.strip("/").replace("/", "_") / rest
        raise ValueError(f"{inside} is not inside a mounted directory")

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def bin_dir(self) -> Path:
        return self.base / "bin"


class ContainerHost:
    """The containers of one :class:`FakeVast` (``FakeVast(containers=ContainerHost())``)."""

    def __init__(self, *, python: str = sys.executable) -> None:
        self.python = python
        self.root = Path(tempfile.mkdtemp(prefix="fakevast-containers-"))
        self.containers: dict[int, Container] = {}
        self.vast: FakeVast | None = None
        self._tools_all = self._tools("tools-all", frozenset())
        self._tools_plain = self._tools("tools-plain", PLAIN_MISSING)
        for mount in MOUNTS:
            os.makedirs(mount, exist_ok=True)

    def _tools(self, name: str, missing: frozenset[str]) -> Path:
        """A PATH directory with the host's commands except ``missing``."""
        out = self.root / name
        out.mkdir()
        for directory in HOST_BIN_DIRS:
            with contextlib.suppress(OSError):
                for entry in os.scandir(directory):
                    target = out / entry.name
                    if entry.name in missing or target.exists() or target.is_symlink():
                        continue
                    if os.access(entry.path, os.X_OK) and not entry.is_dir():
                        target.symlink_to(entry.path)
        return out

    # ------------------------------------------------------------------ life cycle

    async def create(self, inst: FakeInstance) -> int:
        """Lay out the instance's disk and start its SSH server; returns the SSH port."""
        base = self.root / str(inst.id)
        comfy = is_comfy_image(inst.image)
        c = Container(inst.id, inst.image, base, asyncssh.generate_private_key("ssh-ed25519"),
                      env={}, comfy=comfy)
        for mount in MOUNTS:
            c.path(mount).mkdir(parents=True)
        c.run_dir.mkdir()
        c.bin_dir.mkdir()
        tools = self._tools_all if comfy else self._tools_plain
        image_env = {"PATH": f"{c.bin_dir}:{tools}" if comfy else str(tools)}
        if comfy:
            self._lay_out_comfy_image(c)
            image_env.update({"WORKSPACE": "/workspace", "DATA_DIRECTORY": "/workspace/"})
        c.env = image_env
        c.acceptor = await asyncssh.listen(
            "127.0.0.1", 0, server_factory=lambda: _SSHServer(self, c),
            server_host_keys=[c.host_key], process_factory=lambda p: self._session(c, p),
            encoding=None, allow_scp=False, reuse_address=True,
        )
        c.port = c.acceptor.sockets[0].getsockname()[1]
        self.containers[inst.id] = c
        return c.port

    def _lay_out_comfy_image(self, c: Container) -> None:
        comfy = c.path("/opt/workspace-internal/ComfyUI")
        comfy.mkdir(parents=True)
        (comfy / "main.py").write_text(MAIN_PY.format(repo=str(REPO_ROOT), python=self.python))
        (comfy / "comfyui_version.py").write_text('__version__ = "0.22.0"\n')
        (comfy / "models" / "checkpoints").mkdir(parents=True)
        run, bin_ = c.run_dir, c.bin_dir
        scripts = {
            # entrypoint.sh -> entrypoint_base.sh -> /etc/vast_boot.d/*: 36-sync-workspace
            # puts ComfyUI into $WORKSPACE, then supervisord runs in the foreground.
            "entrypoint.sh": f"""#!/bin/sh
echo "$(date +%s) entrypoint" >> {run}/entrypoint.log
[ -d "$WORKSPACE/ComfyUI" ] || cp -a /opt/workspace-internal/ComfyUI "$WORKSPACE/ComfyUI"
exec sh {bin_}/supervisord
""",
            # supervisord with the comfyui program: autorestart=unexpected, exitcodes=0
            # (a skipped program exits 0 and stays down).
            "supervisord": f"""#!/bin/sh
echo $$ > {run}/supervisord.pid
while :; do
  sh {bin_}/comfyui-program >> {run}/comfyui.log 2>&1 &
  echo $! > {run}/comfyui.pid
  echo RUNNING > {run}/comfyui.state
  wait $!
  code=$?
  if [ "$code" -eq 0 ]; then echo EXITED > {run}/comfyui.state; break; fi
  echo BACKOFF > {run}/comfyui.state
  sleep 0.5
done
while :; do sleep 3600; done
""",
            # supervisor-scripts/comfyui.sh: exits unless PORTAL_CONFIG names ComfyUI.
            "comfyui-program": f"""#!/bin/sh
case "$PORTAL_CONFIG" in
  *ComfyUI*) ;;
  *) echo "Skipping ComfyUI startup (not in /etc/portal.yaml)"; exit 0 ;;
esac
COMFYUI_ARGS=${{COMFYUI_ARGS:---disable-auto-launch --port 18188 --enable-cors-header}}
cd "$WORKSPACE/ComfyUI" || exit 1
exec {self.python} main.py $COMFYUI_ARGS
""",
            "supervisorctl": f"""#!/bin/sh
state=$(cat {run}/comfyui.state 2>/dev/null || echo STOPPED)
pid=$(cat {run}/comfyui.pid 2>/dev/null)
case "$1" in
  status)
    if [ "$state" = RUNNING ] && kill -0 "$pid" 2>/dev/null; then
      echo "comfyui                          RUNNING   pid $pid"; exit 0
    fi
    echo "comfyui                          $state"; exit 3 ;;
  start|restart)
    if ! kill -0 "$(cat {run}/supervisord.pid 2>/dev/null)" 2>/dev/null; then
      echo "unix:///var/run/supervisor.sock no such file" >&2; exit 7
    fi
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    echo "comfyui: started" ;;
  *) echo "usage: supervisorctl status|start|restart comfyui" >&2; exit 2 ;;
esac
""",
        }
        for name, text in scripts.items():
            path = bin_ / name
            path.write_text(text)
            path.chmod(0o755)

    def boot(self, inst: FakeInstance) -> None:
        """The instance turned running: a fresh namespace, then its onstart (not awaited)."""
        c = self.containers.get(inst.id)
        if c is None or c.up.is_set() or (c.booting and not c.booting.done()):
            return
        c.boots += 1
        env = {k: v for k, v in inst.env.items() if not k.startswith("-")}
        env.update(c.env)
        env.update({"HOME": "/root", "USER": "root", "SHELL": "/bin/sh",
                    "CONTAINER_ID": str(inst.id), "CONTAINER_API_KEY": inst.instance_api_key,
                    "VAST_CONTAINERLABEL": f"C.{inst.id}",
                    "PUBLIC_IPADDR": inst.public_ipaddr})
        c.booting = asyncio.get_running_loop().create_task(
            self._boot(c, inst.onstart or "", env), name=f"fake-boot-{inst.id}")

    async def _boot(self, c: Container, onstart: str, env: dict[str, str]) -> None:
        binds = " && ".join(
            f"mount --bind {shlex.quote(str(c.path(m)))} {m}" for m in MOUNTS)
        # Refuse to mount anything unless this really is a namespace of its own.
        script = ('[ "$(readlink /proc/self/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] || exit 9\n'
                  f"{binds} && echo ready && exec sleep 1000000")
        holder = await asyncio.create_subprocess_exec(
            "unshare", "-m", "--propagation", "private", "sh", "-c", script,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True)
        assert holder.stdout is not None
        line = await holder.stdout.readline()
        if line.strip() != b"ready":
            err = await holder.stderr.read() if holder.stderr else b""
            raise RuntimeError(f"the fake container did not start: {err!r}")
        c.holder = holder
        c.namespace = os.readlink(f"/proc/{holder.pid}/ns/mnt")
        c.up.set()
        if onstart:
            c.onstart_runs += 1
            log_file = (c.run_dir / "onstart.log").open("ab")  # noqa: ASYNC230, SIM115
            proc = await asyncio.create_subprocess_exec(
                *self._enter(c, onstart), env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file, stderr=log_file, start_new_session=True)
            log_file.close()
            c.procs[proc] = asyncio.get_running_loop().create_task(proc.wait())

    def _enter(self, c: Container, command: str) -> list[str]:
        assert c.holder is not None
        return ["nsenter", "-t", str(c.holder.pid), "-m", "--", "/bin/sh", "-c",
                'cd /root 2>/dev/null; exec /bin/sh -c "$1"', "sh", command]

    def halt(self, inst: FakeInstance | int) -> None:
        """Stop the container: every process of it dies, SSH goes away."""
        c = self.containers.get(inst if isinstance(inst, int) else inst.id)
        if c is None:
            return
        if c.booting is not None and not c.booting.done():
            c.booting.cancel()
        c.up.clear()
        for conn in list(c.conns):
            conn.abort()
        c.conns.clear()
        if c.namespace is not None:
            for pid in _pids_in(c.namespace):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        c.namespace = None
        c.holder = None

    async def destroy(self, inst_id: int) -> None:
        self.halt(inst_id)
        c = self.containers.pop(inst_id, None)
        if c is None:
            return
        if c.acceptor is not None:
            c.acceptor.close()
        for task in c.procs.values():
            task.cancel()
        shutil.rmtree(c.base, ignore_errors=True)

    async def close(self) -> None:
        for inst_id in list(self.containers):
            await self.destroy(inst_id)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ SSH

    def authorized(self, c: Container, key: asyncssh.SSHKey) -> bool:
        """The account's keys, the keys attached to the instance (Vast installs both) and
        whatever the container's ~/.ssh/authorized_keys holds (onstart appends ours)."""
        wanted = key.export_public_key("openssh").decode().split()[:2]
        lines: list[str] = []
        if self.vast is not None:
            lines += [k.get("public_key", "") for k in self.vast.ssh_keys
                      if k.get("deleted_at") is None]
            inst = self.vast.instances.get(c.inst_id)
            if inst is not None:
                lines += [k.get("public_key", "") or k.get("ssh_key", "") for k in inst.ssh_keys]
        with contextlib.suppress(OSError):
            lines += c.path("/root/.ssh/authorized_keys").read_text().splitlines()
        return any(line.split()[:2] == wanted for line in lines if line.strip())

    async def _session(self, c: Container, process: asyncssh.SSHServerProcess[bytes]) -> None:
        if not c.up.is_set():
            process.exit(255)
            return
        # What an SSH session sees: no container variables (vast.md section 5).
        env = {"PATH": c.env["PATH"], "HOME": "/root", "USER": "root", "LOGNAME": "root",
               "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
        env.update({str(k): str(v) for k, v in process.env.items()})
        proc = await asyncio.create_subprocess_exec(
            *self._enter(c, process.command or "exec /bin/sh"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        reaper = asyncio.create_task(proc.wait())
        c.procs[proc] = reaper
        reaper.add_done_callback(lambda _: c.procs.pop(proc, None))
        feeder = asyncio.create_task(_feed_stdin(process, proc))
        try:
            await asyncio.gather(_copy_out(proc.stdout, process.stdout),
                                 _copy_out(proc.stderr, process.stderr))
            status = await asyncio.shield(reaper)
        finally:
            feeder.cancel()
        with contextlib.suppress(Exception):
            if status < 0:
                process.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))
            else:
                process.exit(status)


class _SSHServer(asyncssh.SSHServer):
    def __init__(self, host: ContainerHost, c: Container) -> None:
        self._host, self._c = host, c
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        if not self._c.up.is_set():
            conn.abort()  # a stopped instance answers no SSH
            return
        self._c.conns.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._c.conns.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username in ("root", getpass.getuser()) and self._host.authorized(self._c, key)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return dest_host in _LOOPBACK


def _pids_in(namespace: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                    pids.append(int(entry))
    return pids


# --------------------------------------------------------------------------- ComfyUI


async def _serve_comfy(argv: list[str]) -> None:
    import argparse

    from tests.fakecomfy import FakeComfy

    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    args, _ = parser.parse_known_args(argv)
    fake = FakeComfy(models=COMFY_MODELS, step_delay=0.01, output_size=(64, 64),
                     host=args.listen, port=args.port)
    await fake.start()
    print(f"fake ComfyUI on {args.listen}:{args.port}", flush=True)
    await asyncio.Event().wait()


def _main(argv: list[str]) -> Any:
    if argv[:1] == ["comfy"]:
        return asyncio.run(_serve_comfy(argv[1:]))
    raise SystemExit("usage: python -m tests.fakevast.container comfy [--listen H] [--port P]")


if __name__ == "__main__":
    _main(sys.argv[1:])
