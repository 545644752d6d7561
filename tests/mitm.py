"""Run a real mitmdump subprocess for end-to-end tests, and replay flow files offline.

Every process is started with an explicit confdir under the test's tmp_path (so ~/.mitmproxy is
untouched and each test gets its own CA), listens on 127.0.0.1 only, and is stopped by PID
(SIGTERM, then SIGKILL after 10 s). `--ssl-insecure` is always on because test upstreams use
self-signed certificates.

Pointing clients at a running `Mitmdump` (`m`), regular proxy mode::

    ctx = ssl_context(m.ca_path)                      # trusts mitmproxy's CA (for https:// targets)
    httpx.Client(proxy=m.proxy_url, verify=ctx, http2=True)
    openai.OpenAI(base_url=up.url + "/v1", api_key="k",
                  http_client=openai.DefaultHttpx2Client(proxy=m.proxy_url, verify=ctx))
    anthropic.Anthropic(base_url=up.url, api_key="k",
                        http_client=anthropic.DefaultHttpxClient(proxy=m.proxy_url, verify=ctx))

openai 3.x and anthropic 2.x are both built on `httpx2` (not `httpx`); their `Default*Client`
factories take httpx-style `proxy=` / `verify=` and keep the SDK's timeouts and limits. A plain
`httpx.Client` is also accepted as `http_client`. Env vars (`HTTPS_PROXY`/`HTTP_PROXY` +
`SSL_CERT_FILE`) work too but leak into other clients in the test process: prefer explicit clients.

Reverse mode (`mode="reverse:" + up.url`): no proxy setting; the client talks to mitmdump as if it
were the provider: `base_url=f"http://127.0.0.1:{m.port}/v1"` (or `https://...` with
`verify=ssl_context(m.ca_path)`; the same listener accepts both).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path

MITMDUMP = Path(sys.executable).parent / "mitmdump"
REPO_ROOT = Path(__file__).resolve().parent.parent
ADDON = REPO_ROOT / "addon" / "aistats.py"

_counter = itertools.count()


def free_port() -> int:
    """An ephemeral port that was free a moment ago (mitmdump binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _env() -> dict[str, str]:
    # Unbuffered so .output() shows log lines as they happen; no inherited proxy settings.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def build_args(
    tmp_path: Path,
    script: Path | None,
    options: dict[str, str],
    extra_args: list[str],
) -> list[str]:
    """Common mitmdump arguments: private confdir, optional -s script, --set k=v for each option."""
    args = [str(MITMDUMP), "--set", f"confdir={tmp_path / 'confdir'}"]
    if script is not None:
        args += ["-s", str(script)]
    if script == ADDON and "aistats_metrics_port" not in options:
        options = {**options, "aistats_metrics_port": "0"}  # never the user's default port
    for k, v in options.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra_args)


class Mitmdump:
    """A live mitmdump on 127.0.0.1:<free port>; use as a context manager (always stopped)."""

    def __init__(
        self,
        tmp_path: Path,
        script: Path | None = ADDON,
        options: dict[str, str] | None = None,
        mode: str | None = None,
        write_flows: Path | None = None,
        extra_args: list[str] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.script, self.mode, self.write_flows = script, mode, write_flows
        self.options = dict(options or {})
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        n = next(_counter)
        self.stdout_path = self.tmp_path / f"mitmdump-{n}.stdout"
        self.stderr_path = self.tmp_path / f"mitmdump-{n}.stderr"
        self.returncode: int | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def confdir(self) -> Path:
        return self.tmp_path / "confdir"

    @property
    def ca_path(self) -> Path:
        """mitmproxy's CA cert (PEM); waits up to 10 s for mitmdump to create it."""
        path = self.confdir / "mitmproxy-ca-cert.pem"
        deadline = time.monotonic() + 10
        while not path.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} not created\n{self.output()}")
            time.sleep(0.05)
        return path

    def args(self) -> list[str]:
        extra = ["--listen-host", "127.0.0.1", "--listen-port", str(self.port), "--ssl-insecure"]
        if self.mode:
            extra += ["--mode", self.mode]
        if self.write_flows:
            extra += ["-w", str(self.write_flows)]
        return build_args(self.tmp_path, self.script, self.options, extra + self.extra_args)

    def output(self) -> str:
        """stdout + stderr so far."""
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "".join(parts)

    def start(self) -> Mitmdump:
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.args(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=_env(), cwd=self.tmp_path, process_group=0,  # own group: Ctrl-C hits pytest only
            )
        deadline = time.monotonic() + self.start_timeout
        while not port_open(self.port):
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                raise AssertionError(f"mitmdump exited early with rc={rc}\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mitmdump not listening after {self.start_timeout} s\n{self.output()}")
            time.sleep(0.05)
        return self

    def stop(self) -> int | None:
        """SIGTERM by PID, wait 10 s, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return self.returncode
        self.returncode = stop_process(self.proc)
        self.proc = None
        return self.returncode

    def __enter__(self) -> Mitmdump:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def metrics_url(self, timeout: float = 10.0) -> str:
        """The addon's metrics endpoint, read from its start-up log line (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"aistats: metrics on (http://\S+/metrics)", self.output())
            if m:
                return m.group(1)
            time.sleep(0.05)
        raise AssertionError(f"no metrics endpoint logged within {timeout} s\n{self.output()}")


def stop_process(proc: subprocess.Popen) -> int:
    """Stop a child by its PID: SIGTERM, up to 10 s, then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def replay(
    tmp_path: Path,
    flow_file: Path,
    script: Path | None = ADDON,
    options: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Offline `mitmdump -n -r flow_file`; mitmdump exits by itself when the file is read.

    Raises subprocess.TimeoutExpired (after killing the process) if it runs longer than `timeout`.
    """
    args = build_args(Path(tmp_path), script, dict(options or {}), ["-n", "-r", str(flow_file)])
    return subprocess.run(
        args + list(extra_args or []), capture_output=True, text=True, errors="replace",
        stdin=subprocess.DEVNULL, env=_env(), cwd=tmp_path, timeout=timeout,
    )


def start_mitmdump_expect_failure(
    tmp_path: Path,
    script: Path | None = ADDON,
    options: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 15,
) -> tuple[int, str]:
    """Start a listening mitmdump that should exit during startup; return (returncode, output).

    If it is still running after `timeout` it is killed and AssertionError is raised with its output.
    """
    port = free_port()
    args = build_args(
        Path(tmp_path), script, dict(options or {}),
        ["--listen-host", "127.0.0.1", "--listen-port", str(port), "--ssl-insecure", *(extra_args or [])],
    )
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=_env(), cwd=tmp_path, process_group=0,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        raise AssertionError(
            f"mitmdump still running after {timeout} s (killed)\n{out.decode(errors='replace')}"
        ) from None
    return proc.returncode, out.decode(errors="replace")


def ssl_context(ca_path: Path, extra_cert: Path | None = None) -> ssl.SSLContext:
    """Client context trusting mitmproxy's CA (and `extra_cert`, e.g. Upstream.cert_path)."""
    ctx = ssl.create_default_context(cafile=str(ca_path))
    if extra_cert is not None:
        ctx.load_verify_locations(cafile=str(extra_cert))
    return ctx


def read_flows(path: Path) -> list:
    """All flows in a `-w` file (mitmproxy.io.FlowReader)."""
    with warnings.catch_warnings():  # mitmproxy's flowfilter triggers pyparsing deprecation noise
        warnings.simplefilter("ignore", DeprecationWarning)
        from mitmproxy import io

    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())
