"""Hostile files through every loader: CompVis single files (.ckpt/.safetensors), ESD weights, the app's runs.

A deterministic fuzz corpus (seeded mutations of a few tiny valid files built here) goes through each loader.
Every input must end in one of two ways: it loads, or it raises `EsdError` naming the file. Anything else
(another exception, a hang, a memory blow-up, code from a pickle running) fails the test. The default run is
a few thousand inputs; `-m slow` runs ten times as many. Both print their counts.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from esd import compvis
from esd.app_runs import run_metadata
from esd.cli import main
from esd.config import EraseConfig
from esd.errors import EsdError
from esd.tiny import tiny_sd_pipeline, tiny_unet
from esd.weights import WEIGHT_DTYPES, applied_weights, load_esd_weights, save_esd_weights

SEED = 14  # the number: the corpus is the same on every run
MAX_SECONDS_PER_INPUT = 10  # a loader that takes longer on a tiny file is hanging
MAX_RSS_GROWTH_MB = 1024  # no tiny file may make a loader allocate what it declares

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "U64",
          "Q4", "", "f32", 7, None, ["F32"]]
# Functions and classes a pickle might name, with arguments that would create the marker file if called.
FOREIGN_GLOBALS = [("os", "system"), ("posix", "system"), ("subprocess", "call"), ("builtins", "eval"),
                   ("builtins", "exec"), ("builtins", "open"), ("pathlib", "Path.touch"), ("shutil", "copy"),
                   ("torch", "save"), ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("builtins", "getattr"), ("__main__", "Payload"), ("nt", "system")]


# ------------------------------------------------------------------------------------- tally


@dataclass
class Tally:
    """What a fuzz run did: inputs tried, loaded, refused with EsdError, and anything else (a crash)."""

    name: str
    tried: int = 0
    loaded: int = 0
    esd_errors: int = 0
    crashes: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def run(self, case: str, path: Path, load) -> None:
        self.tried += 1
        start = time.perf_counter()
        try:
            load(path)
            self.loaded += 1
        except EsdError as err:
            self.esd_errors += 1
            if path.name not in str(err):
                self.crashes.append(f"{case}: the error does not name the file: {err}")
        except Exception as err:  # noqa: BLE001  (the point: nothing but EsdError may escape)
            self.crashes.append(f"{case}: {type(err).__name__}: {str(err)[:300]}")
        self.slowest = max(self.slowest, time.perf_counter() - start)

    def add(self, other: Tally) -> None:
        self.tried += other.tried
        self.loaded += other.loaded
        self.esd_errors += other.esd_errors
        self.crashes += other.crashes
        self.slowest = max(self.slowest, other.slowest)

    def report(self, record_property=None) -> str:
        line = (f"fuzz {self.name}: {self.tried} inputs tried, {self.loaded} loaded, {self.esd_errors} EsdErrors, "
                f"{len(self.crashes)} tracebacks, slowest input {self.slowest:.2f} s")
        print(line)
        if record_property is not None:
            for key in ("tried", "loaded", "esd_errors"):
                record_property(f"{self.name}_{key}", getattr(self, key))
            record_property(f"{self.name}_tracebacks", len(self.crashes))
        return line


def _put(path: Path, data: bytes) -> Path:
    """Write a fresh file (overwriting one in place makes ext4 flush it to disk: 100 times slower)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ------------------------------------------------------------------------------------- seed files


def _compvis_tensors() -> dict[str, torch.Tensor]:
    """A few tensors with CompVis names: enough for read_checkpoint, detect_family and the EMA logic."""
    g = torch.Generator().manual_seed(0)
    unet = {"model.diffusion_model.out.2.weight": torch.randn(4, 4, generator=g),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(3, 768, generator=g),
            "model.diffusion_model.time_embed.0.bias": torch.randn(8, generator=g).half()}
    ema = {compvis.ema_key(k): v + 1 for k, v in unet.items()}
    return {**unet, **ema, "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(6)}


def _esd_metadata() -> dict[str, str]:
    return {"format": "esd-unet-subset", "esd_config": EraseConfig(concept="circle").to_json(), "step": "4"}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The valid files the corpus mutates, and what loads them."""
    root = tmp_path_factory.mktemp("seeds")
    tensors = _compvis_tensors()
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"state_dict": tensors, "global_step": 7}, root / "model.ckpt")
    torch.save({"state_dict": {"state_dict": tensors}}, root / "legacy.ckpt", _use_new_zipfile_serialization=False)
    unet = tiny_unet()
    trained = {n: p.detach() + 0.01 for n, p in unet.named_parameters() if "attn2.to_k" in n}
    save_esd_weights(root / "esd.safetensors", trained, _esd_metadata())
    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(root / "pipe")
    compvis.save_compvis(compvis.diffusers_to_compvis(pipe), root / "sd1.safetensors")
    return {"root": root, "unet": unet, "config": root / "pipe",
            "checkpoints": {n: (root / n).read_bytes() for n in ("model.safetensors", "model.ckpt", "legacy.ckpt")},
            "weights": (root / "esd.safetensors").read_bytes(), "single_file": (root / "sd1.safetensors").read_bytes()}


def load_checkpoint(path: Path) -> None:
    """The CompVis reading path up to building models: read, EMA, family."""
    state = compvis.use_ema_weights(compvis.read_checkpoint(path), path)
    compvis.detect_family(state, str(path))


def weights_loader(unet):
    def load(path: Path) -> None:
        before = {n: p.detach().clone() for n, p in unet.named_parameters()}
        with applied_weights(unet, path):
            pass
        assert all(torch.equal(before[n], p) for n, p in unet.named_parameters()), "UNet not restored"
    return load


def load_run(path: Path) -> None:
    """The app reading a run folder's esd.safetensors header (the run is the folder holding the file)."""
    cfg, _ = run_metadata(path.parent)
    assert isinstance(cfg.concepts, list)


# ------------------------------------------------------------------------------------- mutations


def _flip(rng: random.Random, data: bytearray, lo: int = 0, hi: int | None = None) -> bytes:
    """One to four byte-level edits between lo and hi: bit flips, random bytes, huge integers, inserts, cuts."""
    for _ in range(rng.randint(1, 4)):
        end = len(data) if hi is None else min(hi, len(data))  # cuts shrink the data as we go
        if end <= lo:
            break
        i = rng.randrange(lo, end)
        op = rng.randrange(6)
        if op == 0:
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[i] = rng.randrange(256)
        elif op == 2:
            data[i:i + 8] = rng.choice([2**63 - 1, 2**60, 2**32, 2**31, 0, 1]).to_bytes(8, "little")
        elif op == 3:
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            del data[i:i + rng.randint(1, 16)]
        else:
            data[i:i + 4] = b"\xff\xfe\x80\x00"  # not UTF-8, not a pickle opcode that makes sense
    return bytes(data)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A generic mutation: truncation, or edits anywhere or near the start (where headers and pickles live)."""
    kind = rng.randrange(4)
    if kind == 0:
        return data[:rng.randrange(len(data))]
    if kind == 1:
        return _flip(rng, bytearray(data), 0, 512)
    if kind == 2:
        return _flip(rng, bytearray(data))
    return data + rng.randbytes(rng.randint(1, 64))  # trailing junk


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _safetensors_bytes(header, body: bytes, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + body


def mutate_safetensors(rng: random.Random, data: bytes) -> bytes:
    """A mutation that knows the format: a wrong dtype, shape or offsets, a bad header length or header JSON."""
    header, body = _safetensors_parts(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.randrange(12)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == 1:
        entry["shape"] = rng.choice([[], [0], [-1], [2**40, 2**40], [2**62], [1, 2, 3, 4, 5, 6, 7, 8, 9], ["a"], [2.5],
                                     None, [*entry["shape"], 1], entry["shape"][::-1]])
    elif kind == 2:
        start, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, start], [0, 2**62], [start, end + 4], [-1, end], [start], None,
                                            [start, start], [0, 8 * 2**30]])
    elif kind == 3:
        header[name] = {"dtype": "F32", "shape": [2**17, 2**17], "data_offsets": [0, 2**36]}  # a 64 GiB tensor
    elif kind == 4:
        del header[name]
    elif kind == 5:
        header["__metadata__"] = rng.choice([{"format": 5}, ["x"], "x", None, {"esd_config": "{not json"},
                                             {"esd_config": json.dumps({"concept": 5})},
                                             {"esd_config": json.dumps([1, 2])}, {"esd_config": "null"}])
    elif kind == 6:
        return _safetensors_bytes(rng.choice([b"[]", b"5", b'"x"', b"null", b"[{}]", b"{", b"{}}"]), body)
    elif kind == 7:
        text = json.dumps(header).encode()
        i = rng.randrange(len(text))
        return _safetensors_bytes(text[:i] + rng.choice([b"\xff", b"\xc3", b"\x80\x80", b"\x00"]) + text[i:], body)
    elif kind == 8:
        text = json.dumps(header).encode()
        length = rng.choice([2**60, 2**64 - 1, 0, 1, len(text) - 1, len(text) + 1, len(text) + len(body) + 1])
        return _safetensors_bytes(text, body, length)
    elif kind == 9:
        return _safetensors_bytes(header, body[:rng.randrange(len(body) + 1)])
    elif kind == 10:
        header[name + "x"] = dict(entry)  # two names on one byte range
    else:
        return _flip(rng, bytearray(_safetensors_bytes(header, body)), 8, 8 + len(json.dumps(header)))
    return _safetensors_bytes(header, body)


def mutate_tensors(rng: random.Random, data: bytes) -> bytes:
    """A well-formed file with the wrong content: a tensor of another dtype or shape, one missing, one extra, NaN."""
    tensors = safetensors_load(data)
    name = rng.choice(sorted(tensors))
    value = tensors[name]
    kind = rng.randrange(6)
    if kind == 0:
        tensors[name] = value.to(rng.choice([torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64,
                                             torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn]))
    elif kind == 1:
        tensors[name] = value.reshape(-1) if value.ndim > 1 else value.reshape(1, -1)
    elif kind == 2:
        tensors[name] = torch.zeros([d + rng.randint(1, 3) for d in value.shape] or [2])
    elif kind == 3:
        del tensors[name]
    elif kind == 4:
        tensors[rng.choice([name + "x", "model.diffusion_model.extra.weight", "up_blocks.9.attn2.to_k.weight"])] = value.clone()
    else:
        tensors[name] = torch.full_like(value, rng.choice([float("nan"), float("inf")])) if value.is_floating_point() else value
    return safetensors_save(tensors)


def mutate_zip_pickle(rng: random.Random, data: bytes) -> bytes:
    """torch's zip format rebuilt with its data.pkl (or one tensor record) damaged: past the zip's own checks."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as src:
        records = {info.filename: src.read(info) for info in src.infolist()}
    pkl = next(n for n in records if n.endswith("data.pkl"))
    target = pkl if rng.random() < 0.8 else rng.choice([n for n in records if "/data/" in n])
    records[target] = mutate_bytes(rng, records[target])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, content in records.items():
            dst.writestr(name, content)
    return out.getvalue()


def foreign_pickle(rng: random.Random, marker: Path) -> bytes:
    """A pickle that names a function or class and calls it with arguments that would create `marker`."""
    module, name = rng.choice(FOREIGN_GLOBALS)
    arg = rng.choice([f"touch {marker}", f"open({str(marker)!r}, 'w')", str(marker)])
    call = b"c" + module.encode() + b"\n" + name.encode() + b"\n" + pickle.dumps((arg,), protocol=2)[2:-1] + b"R"
    tensor = pickle.dumps(torch.ones(1).numpy(), protocol=2)[2:-1]  # a foreign class too (numpy's reconstruct)
    where = rng.randrange(3)
    if where == 0:
        body = call  # the whole file is the call
    elif where == 1:  # {"state_dict": {"model.diffusion_model.x": <call>}}
        body = b"}" + pickle.dumps("state_dict", protocol=2)[2:-1] + b"}" + pickle.dumps(
            "model.diffusion_model.x", protocol=2)[2:-1] + call + b"ss"
    else:
        body = b"]" + tensor + b"a" + call + b"a"
    return b"\x80" + bytes([rng.choice([2, 4, 5])]) + body + b"."


class Payload:
    """Unpickling this would run `touch MARKER`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------- the corpus


def fixed_cases(folder: Path, seeds: dict, marker: Path) -> list[tuple[str, Path]]:
    """The named hostile files: empty, a folder, code-running pickles, huge declared sizes, odd headers."""
    folder.mkdir()
    header, body = _safetensors_parts(seeds["checkpoints"]["model.safetensors"])
    tensors = _compvis_tensors()
    for name, data in {
        "empty.safetensors": b"",
        "short.ckpt": b"\x80",
        "eight-bytes.safetensors": seeds["checkpoints"]["model.safetensors"][:8],
        "header-2-60.safetensors": _safetensors_bytes(header, body, 2**60),
        "header-max.safetensors": b"\xff" * 8 + b"{}",
        "huge-tensor.safetensors": _safetensors_bytes(
            {"model.diffusion_model.out.2.weight": {"dtype": "F32", "shape": [2**20, 2**20],
                                                    "data_offsets": [0, 2**42]}}, b"\0" * 16),
        "not-utf8.safetensors": _safetensors_bytes(b'{"\xff\xfe": 1}', b""),
        "json-list.safetensors": _safetensors_bytes(b"[1, 2, 3]", b""),
        "json-string.safetensors": _safetensors_bytes(b'"model.diffusion_model"', b""),
        "json-number.safetensors": _safetensors_bytes(b"12345678", b""),
        "text.ckpt": b"this is not a checkpoint at all\n" * 8,
        "html.safetensors": b"<html><body>404 Not Found</body></html>",
        "lfs-pointer.safetensors": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4265146304\n",
    }.items():
        (folder / name).write_bytes(data)
    # A legacy torch file whose storage claims 2**31 elements: the loader must not allocate them.
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.ones(70_000)}}, folder / "huge-legacy.ckpt",
               _use_new_zipfile_serialization=False)
    raw = (folder / "huge-legacy.ckpt").read_bytes()
    _put(folder / "huge-legacy.ckpt", raw.replace(b"J" + (70_000).to_bytes(4, "little"), b"J" + (2**31 - 1).to_bytes(4, "little")))
    with zipfile.ZipFile(folder / "zip-of-text.ckpt", "w") as z:
        z.writestr("archive/data.pkl", "hello")
    save_file({k: v.to(torch.int32) for k, v in tensors.items()}, str(folder / "int-weights.safetensors"))
    # Pickles that would run code: torch.save of an object with __reduce__ (zip and legacy), plain pickles.
    evil = {"state_dict": tensors, "callback": Payload(marker)}
    torch.save(evil, folder / "reduce.ckpt")
    torch.save(evil, folder / "reduce-legacy.ckpt", _use_new_zipfile_serialization=False)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (folder / f"reduce-p{protocol}.pt").write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol))
    # A dict that is its own state_dict (it loops forever if unwrapped naively), a list, odd keys and values.
    loop = dict(tensors)
    loop["state_dict"] = loop
    torch.save(loop, folder / "self-nested.ckpt")
    torch.save([tensors], folder / "list.ckpt")
    torch.save({"state_dict": {1: torch.ones(1), "model.diffusion_model.x": "text"}}, folder / "odd-entries.ckpt")
    (folder / "folder.safetensors").mkdir()
    os.mkfifo(folder / "fifo.ckpt")  # reading a FIFO would block forever
    return [(p.name, p) for p in sorted(folder.iterdir())] + [("missing.ckpt", folder / "missing.ckpt")]


def generated_cases(rng: random.Random, n: int, sources: dict[str, bytes], marker: Path):
    """n seeded mutations of the source files: (label, bytes)."""
    for i in range(n):
        name = rng.choice(list(sources))
        data = sources[name]
        r = rng.random()
        if r < 0.08:
            yield f"{i}-foreign.ckpt", foreign_pickle(rng, marker)
        elif name.endswith(".safetensors") and r < 0.35:
            yield f"{i}-fields-{name}", mutate_safetensors(rng, data)
        elif name.endswith(".safetensors") and r < 0.6:
            yield f"{i}-tensors-{name}", mutate_tensors(rng, data)
        elif name == "model.ckpt" and r < 0.6:
            yield f"{i}-pkl-{name}", mutate_zip_pickle(rng, data)
        else:
            yield f"{i}-bytes-{name}", mutate_bytes(rng, data)


def run_corpus(seeds: dict, tmp: Path, n_small: int, n_single: int) -> Tally:
    """The whole corpus through the three loaders; returns the combined tally."""
    rng = random.Random(SEED)
    marker = tmp / "MARKER"
    rss = _rss_mb()
    total = Tally("all")
    checkpoints = Tally("checkpoint")
    for case, path in fixed_cases(tmp / "fixed", seeds, marker):
        checkpoints.run(case, path, load_checkpoint)
    for case, data in generated_cases(rng, n_small, seeds["checkpoints"], marker):
        checkpoints.run(case, _put(tmp / f"input{Path(case).suffix}", data), load_checkpoint)
    weights = Tally("weights")
    runs = Tally("run")
    (tmp / "run").mkdir()
    load_weights = weights_loader(seeds["unet"])
    for case, data in generated_cases(rng, n_small // 2, {"esd.safetensors": seeds["weights"]}, marker):
        weights.run(case, _put(tmp / "weights.safetensors", data), load_weights)
        runs.run(case, _put(tmp / "run" / "esd.safetensors", data), load_run)
    single = Tally("single-file")
    for case, data in generated_cases(rng, n_single, {"sd1.safetensors": seeds["single_file"]}, marker):
        single.run(case, _put(tmp / "sd1.safetensors", data), lambda p: compvis.load_single_file(p, config=seeds["config"]))
    for part in (checkpoints, weights, runs, single):
        part.report()
        total.add(part)
    assert not marker.exists(), "a pickle ran code while being loaded"
    assert _rss_mb() - rss < MAX_RSS_GROWTH_MB, f"memory grew by {_rss_mb() - rss:.0f} MB on tiny files"
    return total


def _check(total: Tally, record_property) -> None:
    total.report(record_property)
    assert not total.crashes, f"{len(total.crashes)} inputs raised something other than EsdError:\n" + "\n".join(
        total.crashes[:20])
    assert total.slowest < MAX_SECONDS_PER_INPUT, f"an input took {total.slowest:.1f} s"
    assert total.loaded and total.esd_errors  # the corpus has both kinds, or the mutations are not working


@pytest.mark.timeout(120)
def test_fuzz_corpus_every_input_loads_or_is_an_esd_error(seeds, tmp_path, record_property):
    _check(run_corpus(seeds, tmp_path, n_small=2000, n_single=40), record_property)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_corpus_long(seeds, tmp_path, record_property):
    _check(run_corpus(seeds, tmp_path, n_small=20_000, n_single=400), record_property)


# ------------------------------------------------------------------------------------- specific promises


def test_pickle_that_would_run_code_is_refused_naming_what_it_names(seeds, tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": _compvis_tensors(), "x": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(EsdError, match=r"evil.ckpt: the pickle holds Python objects .*refused posix.system"):
        compvis.read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_damaged_pickle_is_called_corrupt_not_foreign(tmp_path):
    (tmp_path / "cut.ckpt").write_bytes(b"\x80\x02\xff.")  # opcode 0xff does not exist
    with pytest.raises(EsdError, match="cut.ckpt: truncated or corrupt PyTorch checkpoint"):
        compvis.read_checkpoint(tmp_path / "cut.ckpt")


def test_folders_and_special_files_are_named_as_such(tmp_path):
    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(EsdError, match="dir.ckpt: a folder, not a checkpoint file"):
        compvis.read_checkpoint(tmp_path / "dir.ckpt")
    with pytest.raises(EsdError, match="dir.ckpt: a folder, not a weights file"):
        load_esd_weights(tmp_path / "dir.ckpt")
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(EsdError, match="pipe.safetensors: not a regular file"):
        load_esd_weights(tmp_path / "pipe.safetensors")


def test_weights_of_the_wrong_dtype_or_not_finite_are_refused_before_the_unet_changes(seeds, tmp_path):
    unet = seeds["unet"]
    name, param = next((n, p) for n, p in unet.named_parameters() if "attn2.to_k" in n)
    before = param.detach().clone()
    for label, value in [("int", torch.ones_like(param, dtype=torch.int64)),
                         ("complex", torch.ones_like(param, dtype=torch.complex64)),
                         ("nan", torch.full_like(param, float("nan"))), ("inf", torch.full_like(param, float("inf")))]:
        save_file({name: value}, str(tmp_path / f"{label}.safetensors"))
        with pytest.raises(EsdError, match=f"{label}.safetensors: .*(dtype|NaN or infinite)"):
            with applied_weights(unet, tmp_path / f"{label}.safetensors"):
                pass
        assert torch.equal(param, before)
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(EsdError, match="holds no tensors"):
        load_esd_weights(tmp_path / "empty.safetensors")
    assert torch.float32 in WEIGHT_DTYPES


def test_single_file_with_an_integer_weight_is_refused_before_building(seeds, tmp_path):
    state = compvis.read_checkpoint(seeds["root"] / "sd1.safetensors")
    key = next(k for k in state if k.endswith("attn2.to_k.weight"))
    state[key] = state[key].to(torch.int64)
    save_file(state, str(tmp_path / "int.safetensors"))
    with pytest.raises(EsdError, match=r"int.safetensors: .*wrong kind of tensor: .*attn2.to_k.weight \(torch.int64"):
        compvis.load_single_file(tmp_path / "int.safetensors", config=seeds["config"])


def test_run_with_a_damaged_config_is_an_error_naming_the_run(seeds, tmp_path):
    unet = seeds["unet"]
    trained = {n: p.detach() for n, p in unet.named_parameters() if "attn2.to_k" in n}
    for label, text in [("notjson", "{not json"), ("list", "[1, 2]"), ("number", '{"concept": 5}')]:
        run = tmp_path / f"run-{label}"
        save_esd_weights(run / "esd.safetensors", trained, {"esd_config": text})
        with pytest.raises(EsdError, match=f"run run-{label}: "):
            run_metadata(run)


# ------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def bad_files(seeds, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    marker = root / "MARKER"
    header, body = _safetensors_parts(seeds["weights"])
    files = {
        "evil.ckpt": None,
        "cut.safetensors": seeds["single_file"][:5000],
        "header-2-60.safetensors": _safetensors_bytes(header, body, 2**60),
        "not-utf8.safetensors": _safetensors_bytes(b'{"\xff": 1}', b""),
        "json-list.safetensors": _safetensors_bytes(b"[]", b""),
        "empty.ckpt": b"",
    }
    for name, data in files.items():
        if data is not None:
            (root / name).write_bytes(data)
    torch.save({"state_dict": _compvis_tensors(), "x": Payload(marker)}, root / "evil.ckpt")
    (root / "folder.safetensors").mkdir()
    return root, [*files, "folder.safetensors"], marker


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_cli_convert_generate_and_erase_name_the_bad_file_and_exit_2(bad_files, tiny_pipe_dir, tmp_path, capsys):
    root, names, marker = bad_files
    tried = 0
    for name in names:
        bad = str(root / name)
        runs = [("convert", bad, str(tmp_path / "out.safetensors")),  # a bad CompVis SRC
                ("convert", str(tiny_pipe_dir), str(tmp_path / "out.safetensors"), "--weights", bad)]
        if name.endswith(".safetensors"):  # generate reads --weights after loading the model: a few only
            runs.append(("generate", "--model", str(tiny_pipe_dir), "--weights", bad, "--prompt", "x", "--steps", "1",
                         "--device", "cpu", "--output", str(tmp_path / "gen")))
        runs.append(("generate", "--model", bad, "--prompt", "x", "--device", "cpu", "--output", str(tmp_path / "gen")))
        runs.append(("erase", "--model", bad, "--concept", "x", "--device", "cpu", "--output", str(tmp_path / "erased")))
        for argv in runs:
            code, err = _cli(capsys, *argv)
            tried += 1
            assert code == 2, (argv, err)
            assert f"esd {argv[0]}: error: " in err and name in err and "Traceback" not in err, (argv, err)
    assert not any((tmp_path / name).exists() for name in ("out.safetensors", "gen", "erased"))
    assert not marker.exists()
    print(f"cli: {tried} bad-file command lines, all exit 2 naming the file")
