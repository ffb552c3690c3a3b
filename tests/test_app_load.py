"""The app's real server on 127.0.0.1 under load and abuse: concurrent clients through its HTTP API.

A dozen `gradio_client` clients, one thread each, erase, compare and download at once on the shipped testbed.
Gradio queues the model tasks one at a time; every client must get the results of its own request (its run,
its concept, its files), and no request may fail. Then path traversal through run names and file URLs
(`../`, absolute paths, `..%2f`, links out of the output folder) must be refused.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")
gradio_client = pytest.importorskip("gradio_client")

from safetensors import safe_open  # noqa: E402

from esd import app as A  # noqa: E402
from esd import app_state as S  # noqa: E402
from esd.app_form import ADVANCED_FIELDS, FORM_FIELDS  # noqa: E402
from esd.config import EraseConfig  # noqa: E402

# Twelve clients: six concepts, each erased by two clients with different seeds, so that run names collide
# unless the app keeps them apart; each client must get back its own concept and seed.
CLIENTS = [(concept, seed) for seed in (1, 2) for concept in ("circle", "square", "triangle", "red", "green", "blue")]
# A tiny erase: two iterations of a two-step sampler, nothing but the weights and the card written.
QUICK = {"recipe": "", "method": "xattn", "iterations": 2, "eta": 1.0, "start_guidance": 3.0, "lr": 1e-3, "seed": 0,
         "ddim_steps": 2, "sample_from": "esd", "separator": "", "erase_from": "", "grid_steps": 0, "save_every": 0,
         "robust": False, "train_text_encoder": False}
SECRET = "not for the browser"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`esd app`'s page on the testbed, served by Gradio on a free localhost port (in this process)."""
    from esd.models import load_pipeline

    out = tmp_path_factory.mktemp("app-runs")
    app = S.EsdApp(load_pipeline(None), out)
    demo = A.build_ui(app)
    port = _free_port()
    A.launch(demo, app, "127.0.0.1", port, block=False)
    url = f"http://127.0.0.1:{port}/"
    yield url, app
    demo.close()


class Counter:
    """Requests made and failed, across threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.errors: list[str] = []

    def call(self, what: str, fn, *args, **kwargs):
        with self.lock:
            self.requests += 1
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            with self.lock:
                self.errors.append(f"{what}: {type(err).__name__}: {err}")
            raise


def _form(concept: str, seed: int, **changes) -> list:
    """The Erase tab's inputs, in the order the erase endpoint takes them."""
    values = {**QUICK, "concept": concept, "seed": seed, **changes}
    return [values[name] for name in FORM_FIELDS + ADVANCED_FIELDS]


def _client(url: str, folder: Path):
    return gradio_client.Client(url, verbose=False, download_files=str(folder), analytics_enabled=False)


def _one_client(url: str, concept: str, seed: int, folder: Path, counter: Counter) -> dict:
    """One user: erase a concept, compare, ask for the session's run, download the run's files. Returns what it saw."""
    client = counter.call("connect", _client, url, folder)
    status, _, _ = counter.call("erase", client.predict, *_form(concept, seed), api_name="/erase")
    assert "Finished" in status, status
    run = re.search(r"Run `([^`]+)` saved", status).group(1)
    original, erased, _ = counter.call("compare", client.predict, f"a {concept}", seed, 2, 1, api_name="/compare")
    label, prompt = counter.call("session run", client.predict, "", api_name="/session_run")
    counter.call("list runs", client.predict, api_name="/list_runs")  # the dropdown learns the new runs
    info, files = counter.call("run files", client.predict, run, api_name="/run_files")  # downloads them too
    with counter.lock:
        counter.requests += len(files) + len(original) + len(erased)  # one GET per file and per image
    return {"concept": concept, "seed": seed, "run": run, "original": original, "erased": erased, "label": label,
            "prompt": prompt, "info": info, "files": [Path(f) for f in files]}


def test_a_dozen_clients_at_once_each_get_their_own_results(server, tmp_path, record_property):
    url, app = server
    counter = Counter()
    start = time.perf_counter()
    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        futures = [pool.submit(_one_client, url, concept, seed, tmp_path / f"client{i}", counter)
                   for i, (concept, seed) in enumerate(CLIENTS)]
        results = [f.result(timeout=300) for f in futures]
    seconds = time.perf_counter() - start
    print(f"app load: {len(CLIENTS)} clients, {counter.requests} requests, {len(counter.errors)} errors, "
          f"{seconds:.1f} s")
    record_property("requests", counter.requests)
    record_property("errors", len(counter.errors))
    record_property("seconds", round(seconds, 1))
    assert not counter.errors, counter.errors
    assert len({r["run"] for r in results}) == len(CLIENTS), "two clients got the same run"
    for r in results:
        concept, run = r["concept"], r["run"]
        assert run.startswith(f"{concept}-xattn-"), (concept, run)
        # Compare: this client's prompt and seed first, the same captions on both sides.
        assert r["original"][0]["caption"] == f"a {concept} · seed {r['seed']}", r["original"][0]
        assert [x["caption"] for x in r["original"]] == [x["caption"] for x in r["erased"]]
        # The session's run is this client's run, and the Save tab offers this run's files.
        assert f"**{run}**" in r["label"] and f"`{concept}`" in r["label"] and r["prompt"] == concept
        assert f"**{run}**" in r["info"]
        names = {p.name for p in r["files"]}
        assert {"esd.safetensors", "README.md", "loss.png"} <= names, names
        weights = next(p for p in r["files"] if p.name == "esd.safetensors")
        with safe_open(str(weights), framework="pt") as f:
            cfg = EraseConfig.from_json(f.metadata()["esd_config"])
        assert (cfg.concept, cfg.seed) == (concept, r["seed"]), (concept, r["seed"], cfg.concept, cfg.seed)
        readme = next(p for p in r["files"] if p.name == "README.md").read_text()
        assert concept in readme
        assert (app.output_dir / run / "esd.safetensors").read_bytes() == weights.read_bytes()
    assert app.lock.acquire(blocking=False), "the model lock was left held"
    app.lock.release()


def test_a_client_that_leaves_mid_erase_does_not_break_the_queue(server, tmp_path):
    """Cancelling (or closing the page) stops that erase; the tasks queued behind it run, none is refused."""
    url, app = server
    quitter = _client(url, tmp_path / "quitter")
    job = quitter.submit(*_form("quitter", 0, iterations=5000), api_name="/erase")
    deadline = time.monotonic() + 60
    while not (app.job and app.job.cfg.concept == "quitter" and app.job.losses) and time.monotonic() < deadline:
        time.sleep(0.05)
    erase = app.job
    assert erase.cfg.concept == "quitter" and erase.losses, "the long erase did not start"
    others = [_client(url, tmp_path / f"other{i}") for i in range(2)]
    queued = [others[0].submit(*_form("square", 7), api_name="/erase"),
              others[1].submit(*_form("circle", 8), api_name="/erase")]
    time.sleep(0.5)  # both wait in the queue behind the long erase
    assert job.cancel()
    for q in queued:
        status = q.result(timeout=120)[0]
        assert "Finished" in status, status
    assert erase.done.wait(60) and erase.result.stopped_early and len(erase.losses) < 5000
    print(f"cancelled erase stopped after {len(erase.losses)} of 5000 iterations; the 2 queued erases finished")


# ------------------------------------------------------------------------------------- abuse


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def planted(server, tmp_path_factory):
    """A secret file beside the output folder, and links to it from inside the output folder and a run."""
    url, app = server
    outside = tmp_path_factory.mktemp("outside")
    secret = outside / "secret.txt"
    secret.write_text(SECRET)
    (outside / "esd.safetensors").write_bytes((app.output_dir.parent / "x").as_posix().encode())
    beside = app.output_dir.parent / "beside.txt"
    beside.write_text(SECRET)
    os.symlink(secret, app.output_dir / "link.txt")
    os.symlink(outside, app.output_dir / "linked-run")
    return {"secret": secret, "beside": beside, "outside": outside}


def test_files_outside_the_output_folder_are_not_served(server, planted, tmp_path):
    url, app = server
    out = app.output_dir
    real = out / "served.txt"
    real.write_text("a file the app may serve")
    status, body = _get(f"{url}gradio_api/file={real}")
    assert status == 200 and body == real.read_bytes(), "the file route itself does not work: the test proves nothing"
    attempts = [str(planted["secret"]), "/etc/passwd", f"{out}/../beside.txt", f"{out}/../{out.name}/../beside.txt",
                f"{out}/..%2fbeside.txt", f"{out}/%2e%2e/beside.txt", f"{out}%2f..%2fbeside.txt",
                f"{out}/link.txt", f"{out}/linked-run/secret.txt", "../" * 12 + "etc/passwd",
                "..%2f" * 12 + "etc%2fpasswd", f"{out}/../../../../../../../etc/passwd"]
    for path in attempts:
        status, body = _get(f"{url}gradio_api/file={path}")
        assert status in (403, 404) and SECRET.encode() not in body and b"root:" not in body, (path, status)
    print(f"file route: {len(attempts)} traversal requests refused")


def test_run_names_that_leave_the_output_folder_are_refused(server, planted, tmp_path):
    url, app = server
    client = _client(url, tmp_path)
    client.predict(api_name="/list_runs")
    bad = ["../beside.txt", "..", ".", "/etc", str(planted["outside"]), "..%2f..%2fetc", "linked-run",
           f"{app.output_dir}/../{app.output_dir.name}", "a/../../b", "\x00", "link.txt"]
    for name in bad:
        for api in ("/run_files", "/load_run"):
            with pytest.raises(gradio_client.exceptions.AppError) as info:
                client.predict(name, api_name=api)
            message = str(info.value)
            assert "not a run" in message or "no run" in message or "not in the list of choices" in message, message
    print(f"run names: {2 * len(bad)} traversal requests refused")


def test_a_damaged_run_is_a_clear_error_not_a_crash(server, tmp_path):
    url, app = server
    run = app.output_dir / "damaged-run"
    run.mkdir()
    (run / "esd.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    client = _client(url, tmp_path)
    client.predict(api_name="/list_runs")
    with pytest.raises(gradio_client.exceptions.AppError, match="run damaged-run: esd.safetensors is not readable"):
        client.predict("damaged-run", api_name="/run_files")
    client.predict("damaged-run", api_name="/load_run")  # the session's run is now the damaged one
    with pytest.raises(gradio_client.exceptions.AppError, match="damaged-run"):
        client.predict("a circle", 0, 2, 1, api_name="/compare")
    assert app.lock.acquire(blocking=False), "the model lock was left held"
    app.lock.release()
